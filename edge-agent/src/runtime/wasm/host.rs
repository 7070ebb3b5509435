//! What a run's wasmtime store holds: the guest's WASI context and the limits checked at each
//! epoch deadline (memory, CPU quota and time, log rate), and the hardware nodes it holds. Its own file: the run (`run.rs`) and
//! the sandbox (`wasi.rs`) both name it, and neither names the other's insides.

use super::cpu::{Meter, Quota};
use super::limits::Limits;
use super::output::OutputBudget;
use std::sync::Arc;
use std::time::Duration;

pub(super) struct Host<W> {
    pub(super) wasi: W,
    pub(super) limits: Limits,
    pub(super) meter: Arc<Meter>,
    pub(super) quota: Option<Quota>,
    /// `spec.limits.cpuTime`: busy time after which the run is stopped.
    pub(super) cpu_time: Option<Duration>,
    /// `spec.limits.logRate`, counted by the guest's output streams.
    pub(super) output: Option<Arc<OutputBudget>>,
    /// The hardware nodes the run may open, and those it has open.
    pub(super) devices: super::devices::Devices,
}

impl<W> super::devices::HasDevices for Host<W> {
    fn devices(&mut self) -> &mut super::devices::Devices {
        &mut self.devices
    }
}
