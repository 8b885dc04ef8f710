//! Record builders shared by the unit tests.

use herd_proto::v1::{WorkerInfo, WorkerLoad, WorkerState};

use crate::registry::Lease;

/// The lease the unit tests register and heartbeat with.
pub fn lease() -> Lease {
    Lease::of("the test worker's lease")
}

/// A worker record as a worker would register it, with zero load.
pub fn worker(id: &str, models: &[&str]) -> WorkerState {
    WorkerState {
        info: Some(WorkerInfo {
            worker_id: id.to_owned(),
            address: format!("http://127.0.0.1:7001/{id}"),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            context_length: 2048,
            max_batch_size: 8,
            max_queue: 64,
            tp_size: 1,
            devices: vec!["cpu".to_owned()],
        }),
        load: Some(load(0, 0)),
    }
}

/// A load report.
pub fn load(running: u32, waiting: u32) -> WorkerLoad {
    WorkerLoad { running, waiting, ..Default::default() }
}
