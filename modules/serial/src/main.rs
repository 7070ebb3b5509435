//! `serial`: a WASI preview 1 core module (build with `--target wasm32-wasip1`) that talks to
//! a serial device through the agent's `shoal_device` host functions.
//!
//! Opens the first node of `SHOAL_DEVICES_SERIAL` (what its replica was granted), writes
//! `ping from {SHOAL_DEVICE_ID or "?"} {ARG1}\n`, and prints each line it reads back as
//! `reply: LINE`. With `--once` it exits after the first reply; otherwise it keeps the
//! device open and answers every line. `--try PATH` first tries to open PATH and prints
//! `open PATH: CODE` (the tests use it to show that an ungranted node stays closed).

#[link(wasm_import_module = "shoal_device")]
extern "C" {
    fn device_open(path: *const u8, len: usize) -> i32;
    fn device_read(handle: i32, buf: *mut u8, len: usize, timeout_ms: i32) -> i32;
    fn device_write(handle: i32, buf: *const u8, len: usize) -> i32;
}

fn open(path: &str) -> i32 {
    // SAFETY: the host reads `len` bytes at `path`, which point into this string.
    unsafe { device_open(path.as_ptr(), path.len()) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let once = args.iter().any(|a| a == "--once");
    let label = args.get(1).filter(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == "--try") {
        let path = args.get(i + 1).cloned().unwrap_or_default();
        println!("open {path}: {}", open(&path));
    }
    let nodes = std::env::var("SHOAL_DEVICES_SERIAL").unwrap_or_default();
    let Some(path) = nodes.split(',').find(|p| !p.is_empty()) else {
        eprintln!("no serial device granted (SHOAL_DEVICES_SERIAL is empty)");
        std::process::exit(2);
    };
    let h = open(path);
    if h < 0 {
        eprintln!("cannot open {path}: {h}");
        std::process::exit(3);
    }
    let device = std::env::var("SHOAL_DEVICE_ID").unwrap_or_else(|_| "?".into());
    let ping = format!("ping from {device} {label}\n");
    // SAFETY: the host reads `len` bytes of `ping`.
    let wrote = unsafe { device_write(h, ping.as_ptr(), ping.len()) };
    println!("opened {path}, wrote {wrote} bytes");
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { device_read(h, buf.as_mut_ptr(), buf.len(), 1000) };
        if n < 0 {
            eprintln!("read failed: {n}");
            std::process::exit(4);
        }
        for &b in &buf[..n as usize] {
            if b == b'\n' {
                println!("reply: {}", String::from_utf8_lossy(&line).trim_end_matches('\r'));
                line.clear();
                if once {
                    return;
                }
            } else {
                line.push(b);
            }
        }
    }
}
