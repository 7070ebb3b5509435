//! The loop's typed inputs and outputs, the ports its adapters implement. Topics and payload
//! bytes exist only in the MQTT adapter ([`crate::mqtt`]), which decodes what arrives into a
//! [`BusEvent`] and encodes each [`Outbound`]; status codes exist only in the HTTP adapter,
//! whose requests arrive as [`crate::http::Request`].

use crate::http::Request;
use crate::mqtt::wire::ReplyTo;
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::wire::messages::{
    ApplyResult, DeviceStatus, Hello, IngestBatch, LogChunk, LogRequest,
};
use shoal_daemon::mdns::MdnsEvent;
use std::future::Future;

/// What the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    Bus(BusEvent),
    Http(Request),
    Mdns(MdnsEvent),
    /// The enrollment book answered a read (see `app::book`).
    Book(crate::app::book::BookAnswer),
    /// Time to look for lost devices.
    Tick,
    /// Time to step rollouts that have new reports.
    RolloutTick,
    /// Time to pass what this replica heard on to the others (see [`crate::fleet::ingest`]).
    RelayTick,
}

/// What arrived over MQTT, decoded. A device's message names the device its topic names
/// (the adapter drops any other, and anything malformed, with a warning).
#[derive(Debug)]
pub enum BusEvent {
    /// (Re)connected and subscribed: retained messages may have been lost, republish.
    Connected,
    /// A manifest applied over MQTT.
    Apply(Box<MqttApply>),
    Hello(Box<Hello>),
    /// Presence changed: `online`, or offline (the device said so, or its last will did).
    Presence {
        device: DeviceId,
        online: bool,
    },
    Status(Box<DeviceStatus>),
    /// Another hub replica's ingest batch (see [`crate::fleet::ingest`]); `replica` names
    /// the replica that sent it.
    Ingest {
        replica: String,
        batch: Box<IngestBatch>,
    },
    /// Log lines a device sends for a `shoal logs` request.
    Logs(Box<LogChunk>),
}

/// A manifest applied over MQTT.
#[derive(Debug)]
pub struct MqttApply {
    pub text: String,
    /// The request id the operator's topic carried.
    pub req: Option<String>,
    /// The operator who sent it, as the embedded broker's guard says (only a claim through
    /// another broker: see `MainLoop::attributed_applies`).
    pub by: Option<String>,
    /// Where the result goes (opaque: the adapter's business).
    pub reply: ReplyTo,
}

/// What the loop sends over MQTT.
#[derive(Debug)]
pub enum Outbound {
    /// A device's desired state, signed by the hub (retained).
    Desired { device: DeviceId, signed: Vec<u8> },
    /// The answer to an [`MqttApply`].
    ApplyResult { to: ReplyTo, result: ApplyResult },
    /// This replica's ingest batch for the others.
    Ingest { replica: String, batch: IngestBatch },
    /// A `shoal logs` request (signed) for a device.
    LogRequest { device: DeviceId, req: LogRequest },
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("mqtt publish to {to:?} failed: {reason}")]
pub struct BusError {
    pub to: String,
    pub reason: String,
}

/// The sending side of the bus (the MQTT adapter, or a fake in tests).
pub trait Bus: Send + Sync + 'static {
    fn send(&self, msg: Outbound) -> impl Future<Output = Result<(), BusError>> + Send;
}

/// The change was decided but could not be made durable (the store's flush failed): nothing
/// was published, and whoever asked must not be told it worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the hub could not make the change durable (store flush failed); it retries, check the hub's disk")]
pub struct NotDurable;

/// Why an operator's change was not made: refused by the fleet (`R`, the operator's to
/// fix), or not durable (the hub's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failed<R> {
    #[error(transparent)]
    Refused(R),
    #[error(transparent)]
    NotDurable(#[from] NotDurable),
}

/// Why `shoal logs` has nobody to ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogRefusal {
    #[error("workload {:?} not found", .0.as_str())]
    WorkloadNotFound(WorkloadName),
    #[error("device {:?} not found", .0.as_str())]
    DeviceNotFound(DeviceId),
    #[error("workload {:?} has no replica placed on a device yet", .0.as_str())]
    NotPlaced(WorkloadName),
}
