//! The MQTT adapter, the only code that names rumqttc or rumqttd, topics or payload bytes:
//!
//! - [`bus`]: the hub's own client; what arrives becomes the loop's typed events, what the
//!   loop sends ([`crate::app::command::Outbound`]) is published;
//! - [`wire`]: topics and payloads to typed events and back;
//! - [`broker`]: the embedded broker (rumqttd behind a front listener that authenticates,
//!   admits and guards every packet).

pub mod broker;
pub mod bus;
pub mod wire;
