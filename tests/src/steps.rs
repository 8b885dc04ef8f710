//! Reading a sequence's steps from the worker's scheduler.

use herd_worker::scheduler::StepResult;
use tokio::sync::mpsc::UnboundedReceiver;

/// The token ids of a sequence's steps, up to its last; panics on an error or a cut stream.
pub fn collect(rx: &mut UnboundedReceiver<StepResult>) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Some(step) = rx.blocking_recv() {
        let step = step.expect("a step");
        ids.extend(step.token);
        if step.finish.is_some() {
            return ids;
        }
    }
    panic!("the stream ended before its last step");
}
