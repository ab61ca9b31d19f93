//! The Task API: `runtime` owns containers and their operations, `process`
//! one process's lifecycle, `service` the ttrpc binding.

pub mod process;
pub mod runtime;
pub mod service;
