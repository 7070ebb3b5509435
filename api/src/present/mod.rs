//! For people: kubectl-style tables and escaping of untrusted text, shared by the three
//! command lines (`shoal`, `shoal-hub`'s subcommands and the agent's local CLI).

pub mod printable;
pub mod table;
