//! The log of a container: the shim appends to it, so it is kept bounded by copytruncate
//! ([`bound_log`]), checked every [`LOG_CHECK`] while the container runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a running container's log size is checked (also the precision of its time
/// index, see [`crate::logs::Sampler`]).
pub(super) const LOG_CHECK: Duration = Duration::from_secs(1);

/// Keeps a log the shim appends to within about `max` bytes: once over, its content is copied
/// to `{path}.1` (replacing the older one) and the file truncated in place. The shim writes
/// with `O_APPEND`, so it simply goes on at the new end (copytruncate, as logrotate does: a
/// line written between the copy and the truncation may be lost). Written by hand: no crate
/// rotates a file another process holds open.
pub async fn bound_log(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    tokio::fs::copy(path, PathBuf::from(rotated)).await?;
    tokio::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .await?
        .set_len(0)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn container_logs_are_bounded_by_copytruncate() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("box-0.log");
        assert!(!bound_log(&log, 10).await.unwrap(), "no file yet");
        std::fs::write(&log, "0123456789").unwrap();
        assert!(!bound_log(&log, 10).await.unwrap(), "within the bound");
        std::fs::write(&log, "0123456789abc").unwrap();
        assert!(bound_log(&log, 10).await.unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("box-0.log.1")).unwrap(),
            "0123456789abc"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    }
}
