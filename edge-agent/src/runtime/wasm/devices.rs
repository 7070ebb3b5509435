//! The `shoal:device` host interface: how a WASM guest reaches the hardware nodes its
//! replica holds (`resources.devices`), and nothing else of the device.
//!
//! Why a host interface rather than the nodes in a preopened directory: wasmtime's WASI
//! reads and writes files at an offset (`pread`/`pwrite`, for p1's `fd_read` and p2's
//! `read-via-stream` alike), which a serial port or any other character device refuses
//! (`ESPIPE`). A guest could open such a node but never read it. So a guest opens a node by
//! its path (from `SHOAL_DEVICES_{CLASS}`) through four functions, and the agent reads and
//! writes it as a stream:
//!
//! - core modules (WASI p1) import them from the module [`CORE_MODULE`]:
//!   `device_open(path_ptr, path_len) -> handle`,
//!   `device_read(handle, buf_ptr, buf_len, timeout_ms) -> n` (0: nothing arrived in time),
//!   `device_write(handle, buf_ptr, buf_len) -> n`, `device_close(handle) -> 0`, every
//!   `i32`; a negative result is a [`DeviceError::code`]. (Prefixed: a C or Rust guest's libc
//!   already defines `open`, `read`, `write` and `close`.) `modules/serial` is an example.
//! - components (WASI p2) import the interface [`COMPONENT_INTERFACE`]
//!   (`wit/shoal-device.wit`), the same four with strings and `list<u8>`.
//!
//! Only the paths granted to the replica open; any other is refused (and said once in the
//! replica's log). A terminal is set raw when opened (no echo, line editing or CR/LF
//! translation, as serial protocols such as Modbus RTU need); its speed stays what the
//! system set (`stty`, udev). ioctls are not offered: devices driven by them (V4L2 cameras,
//! `gpiochip` lines, I2C) are for containers. Reads wait in tokio (the node is polled, not
//! read on a thread), so a guest waiting for its sensor does not hold a worker.

use crate::logs::LogSink;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// The import module of the core-module functions.
pub const CORE_MODULE: &str = "shoal_device";
/// The component interface (`wit/shoal-device.wit`).
pub const COMPONENT_INTERFACE: &str = "shoal:device/io@0.1.0";
/// Most nodes a run holds open at once.
const MAX_OPEN: usize = 16;
/// Most bytes one read returns.
const MAX_READ: usize = 64 * 1024;
/// Longest a read waits.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Why a call failed. Core modules get [`DeviceError::code`]; components the message.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} is not granted to this replica (see SHOAL_DEVICES_*)")]
    NotGranted(String),
    #[error("handle {0} is not open")]
    BadHandle(u32),
    #[error("more than {MAX_OPEN} devices open at once")]
    TooMany,
    #[error("{0}")]
    Argument(&'static str),
    #[error("device {path:?}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl DeviceError {
    /// The negative result a core module gets.
    pub fn code(&self) -> i32 {
        match self {
            DeviceError::NotGranted(_) => -1,
            DeviceError::BadHandle(_) => -2,
            DeviceError::TooMany => -3,
            DeviceError::Argument(_) => -4,
            DeviceError::Io { .. } => -5,
        }
    }
}

/// One open node.
struct Node {
    path: String,
    io: NodeIo,
}

enum NodeIo {
    /// Polled by tokio (character devices, pipes).
    Polled(AsyncFd<File>),
    /// What epoll refuses (a regular file): read and written on a blocking thread.
    Blocking(Arc<File>),
}

/// The nodes a run may open, and those it has open.
pub(super) struct Devices {
    granted: Vec<String>,
    open: BTreeMap<u32, Arc<Node>>,
    next: u32,
    log: Option<LogSink>,
    said: bool,
}

impl Devices {
    pub(super) fn new(granted: &[PathBuf], log: Option<LogSink>) -> Self {
        Devices {
            granted: granted
                .iter()
                .filter_map(|p| p.to_str().map(str::to_string))
                .collect(),
            open: BTreeMap::new(),
            next: 0,
            log,
            said: false,
        }
    }

    fn open(&mut self, path: &str) -> Result<u32, DeviceError> {
        if !self.granted.iter().any(|g| g == path) {
            if !self.said {
                self.said = true;
                if let Some(log) = &self.log {
                    log.system(&format!(
                        "open of device {path:?} denied: not granted to this replica"
                    ));
                }
            }
            return Err(DeviceError::NotGranted(path.to_string()));
        }
        if self.open.len() >= MAX_OPEN {
            return Err(DeviceError::TooMany);
        }
        let io = |error| DeviceError::Io {
            path: path.to_string(),
            error,
        };
        let node = match polled(open_node(path).map_err(io)?) {
            Ok(fd) => NodeIo::Polled(fd),
            Err(e) if e.error.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                NodeIo::Blocking(Arc::new(e.into_inner()))
            }
            Err(e) => return Err(io(e.error)),
        };
        self.next = self.next.wrapping_add(1);
        while self.open.contains_key(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        self.open.insert(
            self.next,
            Arc::new(Node {
                path: path.to_string(),
                io: node,
            }),
        );
        Ok(self.next)
    }

    fn node(&self, handle: u32) -> Result<Arc<Node>, DeviceError> {
        self.open
            .get(&handle)
            .cloned()
            .ok_or(DeviceError::BadHandle(handle))
    }

    fn close(&mut self, handle: u32) -> Result<(), DeviceError> {
        self.open
            .remove(&handle)
            .map(drop)
            .ok_or(DeviceError::BadHandle(handle))
    }
}

/// Registers `file` with tokio's reactor (epoll refuses regular files: `EPERM`).
#[allow(unsafe_code)]
fn polled(file: File) -> Result<AsyncFd<File>, Refused> {
    // SAFETY: the `AsyncFd` owns `file`, whose descriptor stays open and the same until the
    // `AsyncFd` is dropped (a `File` never swaps or closes its descriptor on its own).
    unsafe { AsyncFd::register(file) }.map_err(|e| {
        let (file, error) = e.into_parts();
        Refused { file, error }
    })
}

/// A file the reactor would not take, and why.
struct Refused {
    file: File,
    error: std::io::Error,
}

impl Refused {
    fn into_inner(self) -> File {
        self.file
    }
}

/// Opens a node for reading and writing (reading only if writing is refused), without
/// making it the agent's controlling terminal, non-blocking; a terminal is set raw.
fn open_node(path: &str) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = (rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::NONBLOCK).bits() as i32;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)?,
        other => other?,
    };
    if rustix::termios::isatty(&file) {
        let mut t = rustix::termios::tcgetattr(&file)?;
        t.make_raw();
        rustix::termios::tcsetattr(&file, rustix::termios::OptionalActions::Now, &t)?;
    }
    Ok(file)
}

impl Node {
    fn err(&self, error: std::io::Error) -> DeviceError {
        DeviceError::Io {
            path: self.path.clone(),
            error,
        }
    }

    /// Up to `max` bytes, waiting at most `wait` for the first; empty when none came.
    async fn read(&self, max: usize, wait: Duration) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; max.min(MAX_READ)];
        let wait = wait.min(MAX_WAIT);
        let n = match &self.io {
            NodeIo::Polled(fd) => {
                let once = async {
                    loop {
                        let mut ready = fd.readable().await?;
                        match ready.try_io(|f| f.get_ref().read(&mut buf)) {
                            Ok(r) => return r,
                            Err(_would_block) => continue,
                        }
                    }
                };
                match tokio::time::timeout(wait, once).await {
                    Ok(r) => r.map_err(|e| self.err(e))?,
                    Err(_elapsed) => 0,
                }
            }
            NodeIo::Blocking(file) => {
                let file = file.clone();
                let (r, back) = tokio::task::spawn_blocking(move || {
                    let r = file.as_ref().read(&mut buf);
                    (r, buf)
                })
                .await
                .map_err(|e| self.err(std::io::Error::other(e)))?;
                buf = back;
                r.map_err(|e| self.err(e))?
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes what it can of `data` (at least one byte unless `data` is empty).
    async fn write(&self, data: Vec<u8>) -> Result<usize, DeviceError> {
        if data.is_empty() {
            return Ok(0);
        }
        match &self.io {
            NodeIo::Polled(fd) => loop {
                let mut ready = fd.writable().await.map_err(|e| self.err(e))?;
                match ready.try_io(|f| f.get_ref().write(&data)) {
                    Ok(r) => return r.map_err(|e| self.err(e)),
                    Err(_would_block) => continue,
                }
            },
            NodeIo::Blocking(file) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || file.as_ref().write(&data))
                    .await
                    .map_err(|e| self.err(std::io::Error::other(e)))?
                    .map_err(|e| self.err(e))
            }
        }
    }
}

/// What a store's host state lends this interface (the run's `Host` does).
pub(super) trait HasDevices {
    fn devices(&mut self) -> &mut Devices;
}

/// The guest's exported memory.
fn guest_memory<T>(caller: &mut wasmtime::Caller<'_, T>) -> Result<wasmtime::Memory, DeviceError> {
    match caller.get_export("memory") {
        Some(wasmtime::Extern::Memory(m)) => Ok(m),
        _ => Err(DeviceError::Argument("the module exports no memory")),
    }
}

fn range(ptr: i32, len: i32) -> Result<(usize, usize), DeviceError> {
    let p = usize::try_from(ptr).map_err(|_| DeviceError::Argument("negative pointer"))?;
    let l = usize::try_from(len).map_err(|_| DeviceError::Argument("negative length"))?;
    Ok((p, l))
}

fn result(r: Result<i32, DeviceError>) -> i32 {
    r.unwrap_or_else(|e| e.code())
}

/// Adds the core-module functions to `linker`.
pub(super) fn add_to_core_linker<T: HasDevices + Send + 'static>(
    linker: &mut wasmtime::Linker<T>,
) -> wasmtime::Result<()> {
    linker.func_wrap(
        CORE_MODULE,
        "device_open",
        |mut caller: wasmtime::Caller<'_, T>, ptr: i32, len: i32| -> i32 {
            result((|| {
                let (p, l) = range(ptr, len)?;
                let memory = guest_memory(&mut caller)?;
                let bytes = memory
                    .data(&caller)
                    .get(p..p.saturating_add(l))
                    .ok_or(DeviceError::Argument("path out of bounds"))?;
                let path = std::str::from_utf8(bytes)
                    .map_err(|_| DeviceError::Argument("path is not UTF-8"))?
                    .to_string();
                let h = caller.data_mut().devices().open(&path)?;
                i32::try_from(h).map_err(|_| DeviceError::TooMany)
            })())
        },
    )?;
    linker.func_wrap_async(
        CORE_MODULE,
        "device_read",
        |mut caller: wasmtime::Caller<'_, T>, (h, ptr, len, timeout): (i32, i32, i32, i32)| {
            Box::new(async move {
                let r = async {
                    let (p, l) = range(ptr, len)?;
                    let node = caller.data_mut().devices().node(h as u32)?;
                    let wait = Duration::from_millis(u64::try_from(timeout).unwrap_or(0));
                    let bytes = node.read(l, wait).await?;
                    let memory = guest_memory(&mut caller)?;
                    memory
                        .write(&mut caller, p, &bytes)
                        .map_err(|_| DeviceError::Argument("buffer out of bounds"))?;
                    Ok(bytes.len() as i32)
                }
                .await;
                Ok(result(r))
            })
        },
    )?;
    linker.func_wrap_async(
        CORE_MODULE,
        "device_write",
        |mut caller: wasmtime::Caller<'_, T>, (h, ptr, len): (i32, i32, i32)| {
            Box::new(async move {
                let r = async {
                    let (p, l) = range(ptr, len)?;
                    let node = caller.data_mut().devices().node(h as u32)?;
                    let memory = guest_memory(&mut caller)?;
                    let data = memory
                        .data(&caller)
                        .get(p..p.saturating_add(l))
                        .ok_or(DeviceError::Argument("buffer out of bounds"))?
                        .to_vec();
                    let n = node.write(data).await?;
                    Ok(i32::try_from(n).unwrap_or(i32::MAX))
                }
                .await;
                Ok(result(r))
            })
        },
    )?;
    linker.func_wrap(
        CORE_MODULE,
        "device_close",
        |mut caller: wasmtime::Caller<'_, T>, h: i32| -> i32 {
            result(caller.data_mut().devices().close(h as u32).map(|()| 0))
        },
    )?;
    Ok(())
}

/// Adds the component interface to `linker`.
pub(super) fn add_to_component_linker<T: HasDevices + Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
) -> wasmtime::Result<()> {
    let mut i = linker.instance(COMPONENT_INTERFACE)?;
    i.func_wrap(
        "open",
        |mut store: wasmtime::StoreContextMut<'_, T>, (path,): (String,)| {
            Ok((store
                .data_mut()
                .devices()
                .open(&path)
                .map_err(|e| e.to_string()),))
        },
    )?;
    i.func_wrap_async(
        "read",
        |mut store: wasmtime::StoreContextMut<'_, T>, (h, max, timeout): (u32, u32, u32)| {
            Box::new(async move {
                let r = async {
                    let node = store.data_mut().devices().node(h)?;
                    node.read(max as usize, Duration::from_millis(u64::from(timeout)))
                        .await
                }
                .await;
                Ok((r.map_err(|e| e.to_string()),))
            })
        },
    )?;
    i.func_wrap_async(
        "write",
        |mut store: wasmtime::StoreContextMut<'_, T>, (h, data): (u32, Vec<u8>)| {
            Box::new(async move {
                let r = async {
                    let node = store.data_mut().devices().node(h)?;
                    node.write(data).await.map(|n| n as u32)
                }
                .await;
                Ok((r.map_err(|e| e.to_string()),))
            })
        },
    )?;
    i.func_wrap(
        "close",
        |mut store: wasmtime::StoreContextMut<'_, T>, (h,): (u32,)| {
            let _ = store.data_mut().devices().close(h);
            Ok(())
        },
    )?;
    Ok(())
}
