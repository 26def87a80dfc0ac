//! One background task per target (a probe loop, a warm-up), kept in step with the set of
//! targets a pass wants: a target no longer wanted, or changed, has its task aborted; a new one
//! gets a task. Dropping the set aborts every task.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::task::JoinHandle;

/// Tasks by target ID.
#[derive(Debug)]
pub struct PerTarget<T> {
    tasks: Mutex<HashMap<String, (T, JoinHandle<()>)>>,
}

impl<T> Default for PerTarget<T> {
    fn default() -> Self {
        PerTarget {
            tasks: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: PartialEq> PerTarget<T> {
    /// Runs exactly the `wanted` targets, starting each new (or changed) one with `start`.
    pub fn sync(&self, wanted: HashMap<String, T>, start: impl Fn(&T) -> JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|id, (target, handle)| {
            let keep = wanted.get(id) == Some(target);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (id, target) in wanted {
            tasks.entry(id).or_insert_with(|| {
                let handle = start(&target);
                (target, handle)
            });
        }
    }
}

impl<T> Drop for PerTarget<T> {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, (_, handle)) in tasks.drain() {
            handle.abort();
        }
    }
}
