//! What travels: the manifest schema operators write (strict: an unknown field is a typo
//! and is refused), the MQTT topics and messages between hub and agents (permissive:
//! unknown fields are ignored and most fields default, so a newer peer talks to an older
//! one), the mDNS contract, the HTTP API's views and addresses.

pub mod discovery;
pub mod endpoint;
pub mod manifest;
pub mod messages;
pub mod report;
pub mod topics;
pub mod views;
