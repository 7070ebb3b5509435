//! `ticker`: a WASI preview 1 core module (build with `--target wasm32-wasip1`).
//!
//! Pretends to be a sensor: prints `tick N value=V` every `INTERVAL_MS` milliseconds
//! (default 2000), where V is a made-up reading derived from N.
use std::time::Duration;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "sensor".to_string());
    let interval = std::env::var("INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000u64);
    println!("ticker {name} starting (wasip1 module)");
    let mut n: u64 = 0;
    loop {
        n += 1;
        let value = 20.0 + ((n % 10) as f64) * 0.5;
        println!("tick {n} value={value:.1}");
        std::thread::sleep(Duration::from_millis(interval));
    }
}
