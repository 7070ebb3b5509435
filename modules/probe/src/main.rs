//! `probe`: a WASI preview 1 module whose first argument picks a misbehaviour, for tests.
//!
//! - `heartbeat [MS]`: print `beat N` every MS milliseconds (default 100), forever.
//! - `crash`: print a line and exit with status 3.
//! - `hog [MIB]`: allocate (and touch) 1 MiB blocks up to MIB (default: unbounded), printing
//!   the running total; a memory limit below that makes it fail.
//! - `spin`: burn CPU forever, printing `spin N` every 2^24 iterations.
//! - `flood`: print numbered 100-byte lines as fast as it can, forever (log limits).
//! - `count FILE`: read a number from FILE (0 if absent), write it back plus one, print
//!   `count N` and exit 0; with a volume, N counts the runs that ever saw it.
//! - `cat FILE`: print FILE's content and exit 0, or say why not and exit 1 (sandbox tests).
//! - `work N`: N rounds of integer arithmetic (xorshift and a running sum), then print the
//!   result and exit: a fixed amount of pure computation for engine benchmarks.
//! - `secret FILE VAR OUT`: copy FILE's content and environment variable VAR into OUT (a
//!   volume the test reads, so the values never reach the log), print their sizes and
//!   whether FILE can be written, then idle.
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("heartbeat");
    let num = args.get(2).and_then(|v| v.parse::<u64>().ok());
    if mode == "cat" {
        let path = args.get(2).map(String::as_str).unwrap_or("/");
        match std::fs::read_to_string(path) {
            Ok(text) => {
                print!("{text}");
                return;
            }
            Err(e) => {
                println!("probe: cannot read {path}: {e}");
                std::process::exit(1);
            }
        }
    }
    if mode == "secret" {
        let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
        let (file, var, out) = (arg(2), arg(3), arg(4));
        let from_file = std::fs::read_to_string(file).unwrap_or_else(|e| format!("<{e}>"));
        let from_env = std::env::var(var).unwrap_or_else(|e| format!("<{e}>"));
        let writable = std::fs::OpenOptions::new().append(true).open(file).is_ok();
        if let Err(e) = std::fs::write(out, format!("file={from_file}\nenv={from_env}\n")) {
            eprintln!("probe: cannot write {out}: {e}");
            std::process::exit(1);
        }
        println!(
            "secret: file {} bytes, env {} bytes, file {}",
            from_file.len(),
            from_env.len(),
            if writable { "writable" } else { "read-only" }
        );
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if mode == "work" {
        let rounds = num.unwrap_or(10_000_000);
        let (mut x, mut sum) = (0x2545_f491_4f6c_dd1du64, 0u64);
        for i in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sum = sum.wrapping_add(x % (i + 1));
        }
        println!("work {rounds} = {sum}");
        return;
    }
    if mode == "count" {
        let path = args.get(2).map(String::as_str).unwrap_or("/data/count");
        let n = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        if let Err(e) = std::fs::write(path, n.to_string()) {
            eprintln!("probe: cannot write {path}: {e}");
            std::process::exit(1);
        }
        println!("count {n}");
        return;
    }
    match mode {
        "heartbeat" => {
            let ms = num.unwrap_or(100);
            let mut n = 0u64;
            loop {
                n += 1;
                println!("beat {n}");
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        "crash" => {
            println!("probe: about to crash");
            std::process::exit(3);
        }
        "hog" => {
            let limit = num.unwrap_or(u64::MAX);
            let mut blocks: Vec<Vec<u8>> = Vec::new();
            while (blocks.len() as u64) < limit {
                blocks.push(vec![1u8; 1 << 20]);
                println!("hog: holding {} MiB", blocks.len());
            }
            println!("hog: done");
        }
        "flood" => {
            let pad = "x".repeat(90);
            let mut n = 0u64;
            loop {
                n += 1;
                println!("{n:08} {pad}");
            }
        }
        "spin" => {
            let mut x: u64 = 0;
            let mut n = 0u64;
            loop {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if x & 0xff_ffff == 0 {
                    n += 1;
                    println!("spin {n}");
                }
            }
        }
        other => {
            eprintln!("probe: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
