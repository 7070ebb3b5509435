//! `serial-component`: a WASI preview 2 component (build with `--target wasm32-wasip2`) that
//! talks to a serial device through the agent's `shoal:device/io` interface
//! (`wit/shoal-device.wit`): the component twin of `modules/serial`.
//!
//! Opens the first node of `SHOAL_DEVICES_SERIAL`, writes `ping from {ARG1}\n`, prints the
//! first line it reads back as `reply: LINE`, and exits. `--try PATH` first tries to open
//! PATH and prints `open PATH: ERROR` when refused.

wit_bindgen::generate!({
    path: "../../wit/shoal-device.wit",
    world: "device",
});

use shoal::device::io;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let label = args.get(1).filter(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == "--try") {
        let path = args.get(i + 1).cloned().unwrap_or_default();
        match io::open(&path) {
            Ok(_) => println!("open {path}: opened"),
            Err(e) => println!("open {path}: {e}"),
        }
    }
    let nodes = std::env::var("SHOAL_DEVICES_SERIAL").unwrap_or_default();
    let Some(path) = nodes.split(',').find(|p| !p.is_empty()) else {
        eprintln!("no serial device granted (SHOAL_DEVICES_SERIAL is empty)");
        std::process::exit(2);
    };
    let h = match io::open(path) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot open {path}: {e}");
            std::process::exit(3);
        }
    };
    let ping = format!("ping from {label}\n");
    match io::write(h, ping.as_bytes()) {
        Ok(n) => println!("opened {path}, wrote {n} bytes"),
        Err(e) => {
            eprintln!("write failed: {e}");
            std::process::exit(4);
        }
    }
    let mut line = Vec::new();
    loop {
        let bytes = match io::read(h, 256, 1000) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("read failed: {e}");
                std::process::exit(4);
            }
        };
        for b in bytes {
            if b == b'\n' {
                println!("reply: {}", String::from_utf8_lossy(&line));
                io::close(h);
                return;
            }
            line.push(b);
        }
    }
}
