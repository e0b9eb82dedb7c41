//! @platformatic/pg-hooks compatibility: its numeric ids for queues, messages and crons,
//! mapped onto runtime queues (`pg-hooks.<id>`) and crons (`pg-hooks.cron.<id>`).
//! The entities it returns (camelCase, as platformatic-db does) are kept here.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Name of the broker queue behind pg-hooks queue `id`.
pub fn queue_name(id: u64) -> String {
    format!("pg-hooks.{id}")
}

/// Name of the broker cron behind pg-hooks cron `id`.
pub fn cron_name(id: u64) -> String {
    format!("pg-hooks.cron.{id}")
}

/// The pg-hooks entities created through the compatible routes.
#[derive(Default)]
pub struct PgHooks {
    state: Mutex<State>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    last_queue: u64,
    last_message: u64,
    last_cron: u64,
    queues: BTreeMap<u64, serde_json::Value>,
}

impl PgHooks {
    /// The next queue id (ids are never reused, like a SERIAL column).
    pub fn next_queue_id(&self) -> u64 {
        let mut s = self.state.lock().expect("pg-hooks lock");
        s.last_queue += 1;
        s.last_queue
    }

    /// The next message id.
    pub fn next_message_id(&self) -> u64 {
        let mut s = self.state.lock().expect("pg-hooks lock");
        s.last_message += 1;
        s.last_message
    }

    /// The next cron id.
    pub fn next_cron_id(&self) -> u64 {
        let mut s = self.state.lock().expect("pg-hooks lock");
        s.last_cron += 1;
        s.last_cron
    }

    /// Records a created queue entity.
    pub fn put_queue(&self, id: u64, entity: serde_json::Value) {
        self.state
            .lock()
            .expect("pg-hooks lock")
            .queues
            .insert(id, entity);
    }

    /// The whole state as JSON (persisted with the runtime definitions).
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(&*self.state.lock().expect("pg-hooks lock")).expect("serializable")
    }

    /// Restores a snapshot.
    pub fn restore(&self, v: serde_json::Value) -> Result<(), serde_json::Error> {
        *self.state.lock().expect("pg-hooks lock") = serde_json::from_value(v)?;
        Ok(())
    }

    /// Every queue entity, by id.
    pub fn queues(&self) -> Vec<serde_json::Value> {
        self.state
            .lock()
            .expect("pg-hooks lock")
            .queues
            .values()
            .cloned()
            .collect()
    }
}
