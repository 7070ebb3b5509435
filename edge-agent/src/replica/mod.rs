//! One replica's life on the device: its [`supervisor`] (a task per replica, a state
//! machine over the one [`crate::runtime::Runtime`] trait, never asking which variant it
//! runs), the [`prestart`] step that readies its volumes and secrets, and the [`health`]
//! probes the supervisor runs next to it.

pub mod health;
pub mod prestart;
pub mod supervisor;
