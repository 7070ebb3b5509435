//! `hello`: a WASI preview 2 component (build with `--target wasm32-wasip2`).
//!
//! Greets once with its arguments and the `GREETING` environment variable, then prints
//! `heartbeat N` every `INTERVAL_MS` milliseconds (default 1000). With `BEATS=N` it exits
//! successfully after N beats, which makes it a handy `Succeeded` example too.
use std::time::Duration;

fn main() {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".to_string());
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("{greeting} from a wasip2 component; args={args:?}");
    let interval = env_u64("INTERVAL_MS", 1000);
    let beats = std::env::var("BEATS").ok().and_then(|v| v.parse::<u64>().ok());
    let mut n: u64 = 0;
    loop {
        n += 1;
        println!("heartbeat {n}");
        if beats.is_some_and(|b| n >= b) {
            return;
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
