//! One replica's life on the device: its [`supervisor`] (a task per replica, a state
//! machine over the one [`crate::runtime::Runtime`] trait, never asking which variant it
//! runs) and the [`prestart`] step that readies its volumes and secrets.

pub mod prestart;
pub mod supervisor;
