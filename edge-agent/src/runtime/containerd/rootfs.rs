//! Reads a file of a container's root file system before the container exists, from the
//! mounts containerd's snapshotter gave for its snapshot, without mounting them: the
//! directories of an `overlay` mount are searched top layer first, the way overlayfs
//! merges them (a whiteout device hides the name below it, an opaque directory hides the
//! lower layers' entries, a symbolic link is followed inside the image, never on the host);
//! a `bind` mount is one layer. Used to read the image's `/etc/passwd` and `/etc/group`
//! (see [`super::user`]).

use containerd_client::types::Mount;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Symbolic links followed in one lookup at most (as the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;
/// Files larger than this are refused (an `/etc/passwd` is a few KiB).
const MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read files of a {0:?} mount (only overlay and bind mounts)")]
    Unsupported(String),
    #[error("{path:?}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("/{0}: more than {MAX_LINKS} symbolic links")]
    Loop(String),
    #[error("/{0}: larger than {MAX_BYTES} bytes")]
    TooLarge(String),
}

/// The layer directories of a snapshot's `mounts`, top first.
pub fn layers(mounts: &[Mount]) -> Result<Vec<PathBuf>, RootfsError> {
    let mut out = Vec::new();
    for m in mounts {
        let bind = m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if bind {
            out.push(PathBuf::from(&m.source));
        } else if m.r#type == "overlay" {
            let option = |key: &str| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
            };
            out.extend(option("upperdir").map(PathBuf::from));
            out.extend(
                option("lowerdir")
                    .into_iter()
                    .flat_map(|l| l.split(':'))
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from),
            );
        } else {
            return Err(RootfsError::Unsupported(m.r#type.clone()));
        }
    }
    Ok(out)
}

/// The content of the regular file at `path` (from the root) in the merged `layers`;
/// `None` when there is no such file.
pub fn read_file(layers: &[PathBuf], path: &str) -> Result<Option<Vec<u8>>, RootfsError> {
    let mut parts = Vec::new();
    push_parts(&mut parts, path);
    for _ in 0..=MAX_LINKS {
        match find(layers, &parts)? {
            Found::Missing => return Ok(None),
            Found::Link(next) => parts = next,
            Found::File(p) => {
                let io = |source| RootfsError::Io {
                    path: p.clone(),
                    source,
                };
                let mut bytes = Vec::new();
                std::fs::File::open(&p)
                    .map_err(io)?
                    .take(MAX_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io)?;
                if bytes.len() as u64 > MAX_BYTES {
                    return Err(RootfsError::TooLarge(parts.join("/")));
                }
                return Ok(Some(bytes));
            }
        }
    }
    Err(RootfsError::Loop(path.trim_start_matches('/').to_string()))
}

enum Found {
    File(PathBuf),
    Missing,
    /// A symbolic link on the way: look this path up instead.
    Link(Vec<String>),
}

/// Looks `parts` up in the layers, top first, without following any link on the host.
fn find(layers: &[PathBuf], parts: &[String]) -> Result<Found, RootfsError> {
    'layers: for layer in layers {
        let mut at = layer.clone();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            let meta = match std::fs::symlink_metadata(&at) {
                Ok(m) => m,
                // Not in this layer: a lower one may have it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if i > 0 && opaque(at.parent().unwrap_or(layer)) {
                        return Ok(Found::Missing);
                    }
                    continue 'layers;
                }
                Err(source) => return Err(RootfsError::Io { path: at, source }),
            };
            let t = meta.file_type();
            let last = i + 1 == parts.len();
            if t.is_symlink() {
                let target = std::fs::read_link(&at).map_err(|source| RootfsError::Io {
                    path: at.clone(),
                    source,
                })?;
                let mut next = if target.is_absolute() {
                    Vec::new()
                } else {
                    parts[..i].to_vec()
                };
                push_parts(&mut next, &target.to_string_lossy());
                next.extend(parts[i + 1..].iter().cloned());
                return Ok(Found::Link(next));
            }
            if t.is_char_device() && meta.rdev() == 0 {
                return Ok(Found::Missing); // a whiteout: deleted in this layer
            }
            if last {
                return Ok(if t.is_file() {
                    Found::File(at)
                } else {
                    Found::Missing
                });
            }
            if !t.is_dir() {
                return Ok(Found::Missing);
            }
        }
    }
    Ok(Found::Missing)
}

/// Whether overlayfs hides the lower layers' entries of directory `dir`.
fn opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut v = [0u8; 1];
            matches!(rustix::fs::lgetxattr(dir, *name, &mut v[..]), Ok(1) if v[0] == b'y')
        })
}

/// Appends the components of `path` to `parts`, resolving `.` and `..` (never above the
/// root).
fn push_parts(parts: &mut Vec<String>, path: &str) {
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mount(typ: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: typ.into(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn layers_come_from_overlay_and_bind_mounts() {
        let overlay = mount(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/9/work",
                "upperdir=/s/9/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        );
        assert_eq!(
            layers(&[overlay]).unwrap(),
            [PathBuf::from("/s/9/fs"), "/s/2/fs".into(), "/s/1/fs".into()]
        );
        let view = mount("overlay", "overlay", &["ro", "lowerdir=/s/1/fs"]);
        assert_eq!(layers(&[view]).unwrap(), [PathBuf::from("/s/1/fs")]);
        let bind = mount("bind", "/s/1/fs", &["rbind", "rw"]);
        assert_eq!(layers(&[bind]).unwrap(), [PathBuf::from("/s/1/fs")]);
        let other = mount("zfs", "pool/x", &[]);
        assert!(matches!(
            layers(&[other]),
            Err(RootfsError::Unsupported(t)) if t == "zfs"
        ));
    }

    /// Layers `top`, `mid`, `base` in a temporary directory.
    fn stack() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<PathBuf> = ["top", "mid", "base"]
            .iter()
            .map(|l| dir.path().join(l))
            .collect();
        for l in &layers {
            std::fs::create_dir_all(l.join("etc")).unwrap();
        }
        (dir, layers)
    }

    fn text(layers: &[PathBuf], path: &str) -> Option<String> {
        read_file(layers, path)
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn the_top_most_layer_wins() {
        let (_d, l) = stack();
        std::fs::write(l[2].join("etc/passwd"), "base").unwrap();
        std::fs::write(l[2].join("etc/group"), "base group").unwrap();
        std::fs::write(l[1].join("etc/passwd"), "mid").unwrap();
        assert_eq!(text(&l, "/etc/passwd").as_deref(), Some("mid"));
        assert_eq!(text(&l, "etc/group").as_deref(), Some("base group"));
        assert_eq!(text(&l, "/etc/shadow"), None);
        assert_eq!(text(&l, "/etc"), None, "a directory is not a file");
        assert_eq!(text(&l, "/etc/passwd/x"), None);
    }

    #[test]
    fn links_are_followed_inside_the_image() {
        let (_d, l) = stack();
        std::fs::create_dir_all(l[2].join("usr/lib")).unwrap();
        std::fs::write(l[2].join("usr/lib/passwd"), "from usr").unwrap();
        // Absolute targets mean the image's root, not the host's.
        symlink("/usr/lib/passwd", l[0].join("etc/passwd")).unwrap();
        assert_eq!(text(&l, "/etc/passwd").as_deref(), Some("from usr"));
        symlink("../usr/lib/passwd", l[1].join("etc/group")).unwrap();
        assert_eq!(text(&l, "/etc/group").as_deref(), Some("from usr"));
        // A link out of the image stays inside it (on the host, this one is /etc/hostname).
        symlink(
            "../../../../../../../../etc/hostname",
            l[0].join("etc/escape"),
        )
        .unwrap();
        assert_eq!(text(&l, "/etc/escape"), None);
        symlink("loop", l[0].join("etc/loop")).unwrap();
        assert!(matches!(
            read_file(&l, "/etc/loop"),
            Err(RootfsError::Loop(p)) if p == "etc/loop"
        ));
    }

    #[test]
    fn whiteouts_hide_lower_files() {
        let (_d, l) = stack();
        std::fs::write(l[2].join("etc/passwd"), "base").unwrap();
        let whiteout = l[0].join("etc/passwd");
        let made = rustix::fs::mknodat(
            rustix::fs::CWD,
            &whiteout,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0),
            0,
        );
        if made.is_err() {
            eprintln!("SKIPPED: cannot make a whiteout device (not root)");
            return;
        }
        assert_eq!(text(&l, "/etc/passwd"), None);
    }

    #[test]
    fn opaque_directories_hide_lower_layers() {
        let (_d, l) = stack();
        std::fs::write(l[2].join("etc/passwd"), "base").unwrap();
        std::fs::write(l[0].join("etc/group"), "top group").unwrap();
        if rustix::fs::lsetxattr(
            l[0].join("etc"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .is_err()
        {
            eprintln!("SKIPPED: cannot set trusted xattrs here (not root)");
            return;
        }
        assert_eq!(text(&l, "/etc/passwd"), None);
        assert_eq!(text(&l, "/etc/group").as_deref(), Some("top group"));
    }

    #[test]
    fn large_files_are_refused() {
        let (_d, l) = stack();
        std::fs::write(l[0].join("etc/passwd"), vec![b'x'; MAX_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            read_file(&l, "/etc/passwd"),
            Err(RootfsError::TooLarge(p)) if p == "etc/passwd"
        ));
    }
}
