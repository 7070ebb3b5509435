//! The loop's typed inputs and outputs, the ports its adapters implement. Topics and payload
//! bytes exist only in the MQTT adapter ([`crate::mqtt`]), which decodes what arrives into a
//! [`BusEvent`] and encodes each [`Outbound`]; status codes exist only in the HTTP adapter,
//! whose requests arrive as [`super::request::Request`].

use super::keys::NoDeviceKey;
use super::request::Request;
use shoal_api::model::ids::DeviceId;
use shoal_api::model::labels::Grant;
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
    Book(BookAnswer),
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

/// Where an apply's result goes: the MQTT adapter fills it from the apply it decoded and
/// reads it to send the result (its results address, and the response address its
/// publisher asked for where that is allowed). Opaque to the shell, which only passes it on.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    pub(crate) addresses: Vec<String>,
    pub(crate) correlation: Option<bytes::Bytes>,
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
    /// A deleted device: what it retained (hello, status, presence) cleared; its emptied
    /// desired state stays retained.
    Forget { device: DeviceId },
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

/// What the book said.
#[derive(Debug)]
pub enum BookAnswer {
    /// `device`'s certificate (`None`: it has no enrollment record), or why it could not
    /// be read.
    Key {
        device: DeviceId,
        cert: Result<Option<String>, NoDeviceKey>,
    },
    /// What `device`'s join token granted it (`None`: nothing, or the read failed, logged:
    /// the fleet then keeps the labels it has, fewer rights, never more).
    Grant {
        device: DeviceId,
        grant: Option<Grant>,
    },
}
