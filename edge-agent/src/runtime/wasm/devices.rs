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
//! replica's log). A terminal is made transparent for bytes when opened (no echo, line
//! editing, flow control or CR/LF translation) and put back as it was when closed; its speed,
//! character size, parity and stop bits stay what the system set (`stty`, udev). ioctls are
//! not offered: devices driven by them (V4L2 cameras, `gpiochip` lines, I2C) are for
//! containers, as are nodes epoll cannot poll (block devices). Reads wait in tokio (the node
//! is polled), so a guest waiting for its sensor holds no thread; opening and closing run on
//! the blocking pool (a USB adapter's open, a terminal's last close draining its output),
//! never on the executor. A read that finds the node ended (a hung-up terminal: unplugged)
//! fails, so a guest does not spin on empty reads.

use crate::logs::LogSink;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// The import module of the core-module functions.
pub const CORE_MODULE: &str = "shoal_device";
/// The component interface (`wit/shoal-device.wit`).
pub const COMPONENT_INTERFACE: &str = "shoal:device/io@0.1.0";
/// Most nodes a run holds open (or still closing) at once.
const MAX_OPEN: usize = 16;
/// Most bytes one read returns, or one write takes.
const MAX_IO: usize = 64 * 1024;
/// Longest path a guest may name.
const MAX_PATH: usize = 4096;
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
    #[error("device {0:?} hung up (unplugged or closed by the other side)")]
    HungUp(String),
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
            DeviceError::HungUp(_) => -6,
        }
    }
}

/// One open node: polled by tokio's reactor (a node epoll refuses, such as a block device,
/// is refused: it could only be read on a thread, past any timeout).
/// Dropped (closed by the guest, or its run ended) whoever holds it last, it closes on the
/// blocking pool.
struct Node {
    path: String,
    /// `None` only once dropped.
    fd: Option<AsyncFd<File>>,
    /// A terminal's settings before it was opened, put back when it is closed.
    saved: Option<rustix::termios::Termios>,
    /// The run's count of nodes still closing.
    closing: Arc<AtomicUsize>,
}

/// The nodes a run may open, and those it has open.
pub(super) struct Devices {
    granted: Vec<String>,
    open: BTreeMap<u32, Arc<Node>>,
    next: u32,
    /// Nodes closing on the blocking pool (a terminal's last close may wait for its output
    /// to drain): they count against [`MAX_OPEN`] until closed.
    closing: Arc<AtomicUsize>,
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
            closing: Arc::new(AtomicUsize::new(0)),
            log,
            said: false,
        }
    }

    /// Whether `path` may be opened now (granted, and a slot free); the count of closing
    /// nodes to give it.
    fn may_open(&mut self, path: &str) -> Result<Arc<AtomicUsize>, DeviceError> {
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
        if self.open.len() + self.closing.load(Ordering::Relaxed) >= MAX_OPEN {
            return Err(DeviceError::TooMany);
        }
        Ok(self.closing.clone())
    }

    fn insert(&mut self, node: Node) -> u32 {
        // Handles are 1..=i32::MAX, so that a core module's result stays positive.
        loop {
            self.next = if self.next >= i32::MAX as u32 {
                1
            } else {
                self.next + 1
            };
            if !self.open.contains_key(&self.next) {
                break;
            }
        }
        self.open.insert(self.next, Arc::new(node));
        self.next
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

impl Drop for Node {
    /// Closes on the blocking pool (when there is a runtime; else here), the terminal's
    /// settings put back first: a terminal's last close may wait for its output to drain.
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        // Deregistered from the reactor here; the descriptor itself closes below.
        let file = fd.into_inner();
        let saved = self.saved.take();
        let finish = move || {
            if let Some(t) = saved {
                let _ =
                    rustix::termios::tcsetattr(&file, rustix::termios::OptionalActions::Now, &t);
            }
            drop(file);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.closing.fetch_add(1, Ordering::Relaxed);
                let closing = self.closing.clone();
                rt.spawn_blocking(move || {
                    finish();
                    closing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(_) => finish(),
        }
    }
}

/// Opens `path` on the blocking pool (a USB adapter's open may wait on the bus).
async fn open(path: String, closing: Arc<AtomicUsize>) -> Result<Node, DeviceError> {
    let p = path.clone();
    let opened = tokio::task::spawn_blocking(move || open_node(&p))
        .await
        .map_err(|e| DeviceError::Io {
            path: path.clone(),
            error: std::io::Error::other(e),
        })?;
    let (file, saved) = opened.map_err(|error| DeviceError::Io {
        path: path.clone(),
        error,
    })?;
    let fd = polled(file).map_err(|error| DeviceError::Io {
        path: path.clone(),
        error,
    })?;
    Ok(Node {
        path,
        fd: Some(fd),
        saved,
        closing,
    })
}

/// Registers `file` with tokio's reactor (epoll refuses regular files and block devices:
/// `EPERM`, which says so). Terminals always register.
#[allow(unsafe_code)]
fn polled(file: File) -> std::io::Result<AsyncFd<File>> {
    // SAFETY: the `AsyncFd` owns `file`, whose descriptor stays open and the same until the
    // `AsyncFd` is dropped (a `File` never swaps or closes its descriptor on its own).
    unsafe { AsyncFd::register(file) }.map_err(|e| {
        let (_file, error) = e.into_parts();
        if error.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "it cannot be polled (a block device or regular file): give it to a container",
            )
        } else {
            error
        }
    })
}

/// Opens a node for reading and writing (reading only if writing is refused), without
/// making it the agent's controlling terminal, non-blocking. A terminal is made transparent
/// for bytes (no echo, line editing, signals, flow control or CR/LF translation); its speed,
/// character size, parity and stop bits stay as the system set them (8E1 for Modbus RTU,
/// say). Returns the settings it had, to put back on close.
fn open_node(path: &str) -> std::io::Result<(File, Option<rustix::termios::Termios>)> {
    use rustix::termios::{InputModes, LocalModes, OutputModes, SpecialCodeIndex};
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
    if !rustix::termios::isatty(&file) {
        return Ok((file, None));
    }
    let saved = rustix::termios::tcgetattr(&file)?;
    let mut t = saved.clone();
    t.local_modes.remove(
        LocalModes::ICANON
            | LocalModes::ECHO
            | LocalModes::ECHOE
            | LocalModes::ECHOK
            | LocalModes::ECHONL
            | LocalModes::ISIG
            | LocalModes::IEXTEN,
    );
    t.input_modes.remove(
        InputModes::IGNBRK
            | InputModes::BRKINT
            | InputModes::PARMRK
            | InputModes::ISTRIP
            | InputModes::INLCR
            | InputModes::IGNCR
            | InputModes::ICRNL
            | InputModes::IXON,
    );
    t.output_modes.remove(OutputModes::OPOST);
    t.special_codes[SpecialCodeIndex::VMIN] = 1;
    t.special_codes[SpecialCodeIndex::VTIME] = 0;
    rustix::termios::tcsetattr(&file, rustix::termios::OptionalActions::Now, &t)?;
    Ok((file, Some(saved)))
}

impl Node {
    fn err(&self, error: std::io::Error) -> DeviceError {
        DeviceError::Io {
            path: self.path.clone(),
            error,
        }
    }

    fn fd(&self) -> Result<&AsyncFd<File>, DeviceError> {
        self.fd
            .as_ref()
            .ok_or_else(|| DeviceError::HungUp(self.path.clone()))
    }

    /// Up to `max` bytes, waiting at most `wait` for the first; empty when none came. A
    /// node that reads as ended (a hung-up terminal) is an error, not an empty read.
    async fn read(&self, max: usize, wait: Duration) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; max.min(MAX_IO)];
        if buf.is_empty() {
            return Ok(buf);
        }
        let fd = self.fd()?;
        let once = async {
            loop {
                let mut ready = fd.readable().await?;
                match ready.try_io(|f| f.get_ref().read(&mut buf)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        };
        let n = match tokio::time::timeout(wait.min(MAX_WAIT), once).await {
            Ok(Ok(0)) => return Err(DeviceError::HungUp(self.path.clone())),
            Ok(r) => r.map_err(|e| self.err(e))?,
            Err(_elapsed) => 0,
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes what it can of `data` (at least one byte unless `data` is empty).
    async fn write(&self, data: &[u8]) -> Result<usize, DeviceError> {
        if data.is_empty() {
            return Ok(0);
        }
        let fd = self.fd()?;
        loop {
            let mut ready = fd.writable().await.map_err(|e| self.err(e))?;
            match ready.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return r.map_err(|e| self.err(e)),
                Err(_would_block) => continue,
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

/// A guest buffer `ptr..ptr+len` (wasm32 pointers are unsigned), checked against `memory`
/// before anything is read from or written to a device.
fn range<T>(
    caller: &mut wasmtime::Caller<'_, T>,
    ptr: i32,
    len: i32,
) -> Result<(wasmtime::Memory, std::ops::Range<usize>), DeviceError> {
    let memory = guest_memory(caller)?;
    let start = ptr as u32 as usize;
    let end = start.saturating_add(len as u32 as usize);
    if end > memory.data_size(&*caller) {
        return Err(DeviceError::Argument("buffer out of bounds"));
    }
    Ok((memory, start..end))
}

fn result(r: Result<i32, DeviceError>) -> i32 {
    r.unwrap_or_else(|e| e.code())
}

/// Adds the core-module functions to `linker`.
pub(super) fn add_to_core_linker<T: HasDevices + Send + 'static>(
    linker: &mut wasmtime::Linker<T>,
) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        CORE_MODULE,
        "device_open",
        |mut caller: wasmtime::Caller<'_, T>, (ptr, len): (i32, i32)| {
            Box::new(async move {
                let r = async {
                    if len as u32 as usize > MAX_PATH {
                        return Err(DeviceError::Argument("path too long"));
                    }
                    let (memory, at) = range(&mut caller, ptr, len)?;
                    let path = std::str::from_utf8(&memory.data(&caller)[at])
                        .map_err(|_| DeviceError::Argument("path is not UTF-8"))?
                        .to_string();
                    let closing = caller.data_mut().devices().may_open(&path)?;
                    let node = open(path, closing).await?;
                    let h = caller.data_mut().devices().insert(node);
                    Ok(h as i32)
                }
                .await;
                Ok(result(r))
            })
        },
    )?;
    linker.func_wrap_async(
        CORE_MODULE,
        "device_read",
        |mut caller: wasmtime::Caller<'_, T>, (h, ptr, len, timeout): (i32, i32, i32, i32)| {
            Box::new(async move {
                let r = async {
                    let node = caller.data_mut().devices().node(h as u32)?;
                    let (memory, at) = range(&mut caller, ptr, len)?;
                    let wait = Duration::from_millis(u64::from(timeout as u32));
                    let bytes = node.read(at.len(), wait).await?;
                    // The memory may have grown meanwhile, never shrunk: `at` still fits.
                    memory
                        .write(&mut caller, at.start, &bytes)
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
                    let node = caller.data_mut().devices().node(h as u32)?;
                    let (memory, at) = range(&mut caller, ptr, len)?;
                    let end = at.start + at.len().min(MAX_IO);
                    let data = memory.data(&caller)[at.start..end].to_vec();
                    let n = node.write(&data).await?;
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
    i.func_wrap_async(
        "open",
        |mut store: wasmtime::StoreContextMut<'_, T>, (path,): (String,)| {
            Box::new(async move {
                let r = async {
                    if path.len() > MAX_PATH {
                        return Err(DeviceError::Argument("path too long"));
                    }
                    let closing = store.data_mut().devices().may_open(&path)?;
                    let node = open(path, closing).await?;
                    Ok(store.data_mut().devices().insert(node))
                }
                .await;
                Ok((r.map_err(|e| e.to_string()),))
            })
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
        |mut store: wasmtime::StoreContextMut<'_, T>,
         (h, data): (u32, wasmtime::component::WasmList<u8>)| {
            Box::new(async move {
                let r = async {
                    let node = store.data_mut().devices().node(h)?;
                    let bytes = data.as_le_slice(&store);
                    let chunk = bytes[..bytes.len().min(MAX_IO)].to_vec();
                    node.write(&chunk).await.map(|n| n as u32)
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
