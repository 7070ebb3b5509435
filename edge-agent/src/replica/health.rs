//! Health probes of running replicas (`spec.health`): an HTTP GET or a TCP connect to the
//! replica's port on this device's loopback, each bounded by the probe timeout. The
//! supervisor runs one probe per period next to the replica and restarts it after
//! `failureThreshold` failures in a row.

use shoal_api::model::workload::{Check, Health};
use std::time::Duration;

/// Why a probe failed; shown in logs and the replica's status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("tcp connect to port {port}: {error}")]
    Connect { port: u16, error: std::io::Error },
    #[error("tcp connect to port {port}: no answer within {}ms", .timeout.as_millis())]
    ConnectTimeout { port: u16, timeout: Duration },
    #[error("GET {url}: {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("GET {url}: no answer within {}ms", .timeout.as_millis())]
    GetTimeout { url: String, timeout: Duration },
    #[error("GET {url}: {error}")]
    Get { url: String, error: reqwest::Error },
}

/// Waits one period, then probes once. `Err` says what failed, for logs and status.
pub async fn next_probe(h: &Health, client: &reqwest::Client) -> Result<(), ProbeError> {
    tokio::time::sleep(Duration::from_millis(h.period_ms)).await;
    probe(&h.check, Duration::from_millis(h.timeout_ms), client).await
}

pub async fn probe(
    check: &Check,
    timeout: Duration,
    client: &reqwest::Client,
) -> Result<(), ProbeError> {
    match check {
        Check::Tcp { port } => {
            let port = *port;
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(ProbeError::Connect { port, error }),
                Err(_) => Err(ProbeError::ConnectTimeout { port, timeout }),
            }
        }
        Check::Http { port, path } => {
            let url = format!("http://127.0.0.1:{port}{path}");
            match client.get(&url).timeout(timeout).send().await {
                Ok(r) if r.status().is_success() || r.status().is_redirection() => Ok(()),
                Ok(r) => Err(ProbeError::Status {
                    url,
                    status: r.status(),
                }),
                Err(e) if e.is_timeout() => Err(ProbeError::GetTimeout { url, timeout }),
                Err(error) => Err(ProbeError::Get { url, error }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let client = crate::http_client(reqwest::Client::builder()).unwrap_or_default();
        let t = Duration::from_millis(500);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(probe(&Check::Tcp { port }, t, &client).await.is_ok());
        // A tiny HTTP server: 200 on /ok, 500 elsewhere.
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "500 Oops"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let ok = Check::Http {
            port,
            path: "/ok".into(),
        };
        assert!(probe(&ok, t, &client).await.is_ok());
        let bad = Check::Http {
            port,
            path: "/bad".into(),
        };
        let e = probe(&bad, t, &client).await.unwrap_err().to_string();
        assert!(e.contains("500"), "{e}");
        drop(client);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = probe(
            &Check::Tcp { port: closed },
            t,
            &crate::http_client(reqwest::Client::builder()).unwrap_or_default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("port {closed}")), "{e}");
    }
}
