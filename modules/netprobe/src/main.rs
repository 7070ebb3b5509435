//! `netprobe`: a WASI preview 2 component that serves or calls a TCP service, for the
//! service-discovery tests and examples.
//!
//! - `serve PORT`: listen on 0.0.0.0:PORT; answer every connection with one line
//!   `hello from INSTANCE` and close it.
//! - `call SERVICE PORT_NAME [MS]`: every MS milliseconds (default 200) read the endpoints the
//!   agent publishes in `/shoal/services/SERVICE/PORT_NAME` (one `ip:port` per line), print
//!   them when they change, connect to the first one and print its answer.
//! - `connect ADDR...`: every 300 ms connect to each `ip:port` and print its answer or the
//!   error (for the network allow-list tests).
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let me = args.first().cloned().unwrap_or_default();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&me, args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8080)),
        Some("connect") if args.len() >= 3 => connect(&args[2..]),
        Some("call") if args.len() >= 4 => call(
            &args[2],
            &args[3],
            args.get(4).and_then(|m| m.parse().ok()).unwrap_or(200),
        ),
        _ => {
            eprintln!(
                "usage: netprobe serve PORT | netprobe call SERVICE PORT_NAME [MS] | netprobe connect ADDR..."
            );
            std::process::exit(2);
        }
    }
}

fn serve(me: &str, port: u16) {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("netprobe: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("serving on port {port}");
    for conn in listener.incoming() {
        match conn {
            Ok(mut s) => {
                let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let _ = writeln!(s, "hello from {me}");
                println!("answered {peer}");
            }
            Err(e) => eprintln!("netprobe: accept failed: {e}"),
        }
    }
}

fn call(service: &str, port_name: &str, ms: u64) {
    let path = format!("/shoal/services/{service}/{port_name}");
    let mut last = None;
    loop {
        let endpoints = std::fs::read_to_string(&path).unwrap_or_default();
        if last.as_ref() != Some(&endpoints) {
            let list: Vec<&str> = endpoints.lines().collect();
            println!("endpoints of {service}/{port_name}: [{}]", list.join(", "));
            last = Some(endpoints.clone());
        }
        if let Some(first) = endpoints.lines().next() {
            match TcpStream::connect(first) {
                Ok(s) => {
                    let mut line = String::new();
                    let _ = BufReader::new(s).read_line(&mut line);
                    println!("reply from {first}: {}", line.trim_end());
                }
                Err(e) => println!("cannot connect to {first}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn connect(addrs: &[String]) {
    loop {
        for a in addrs {
            match TcpStream::connect(a.as_str()) {
                Ok(s) => {
                    let mut line = String::new();
                    let _ = BufReader::new(s).read_line(&mut line);
                    println!("reply from {a}: {}", line.trim_end());
                }
                Err(e) => println!("cannot connect to {a}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
