//! Who may do what: the fleet's policy on privileged containers, the MQTT topic ACL and the embedded broker's packet guard, keep-alive
//! rules, operator roles and their rights.

pub mod acl;
pub mod fleet;
pub mod mqtt_guard;
pub mod mqtt_keepalive;
pub mod operator;
