//! Heartbeats: what the agent tells the coordinator about itself every `heartbeat_interval`,
//! and the host load it measures for them.
//!
//! The first heartbeat registers the node; every answer may carry runs to cancel.
//! Architecture Invariant: a failed heartbeat is never fatal. The coordinator may be down
//! for a while; the agent keeps running what it has and tries again on the next tick.

use crate::agent::Shared;
use crate::client::CallError;
use crate::retry::FailureLog;
use lull_shared::{AgentState, HeartbeatRequest, HeartbeatResponse, Load};
use std::sync::Arc;
use sysinfo::System;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The host as `sysinfo` sees it.
pub(crate) struct LoadMeter {
    system: System,
}

impl LoadMeter {
    pub(crate) fn new() -> Self {
        let mut system = System::new();
        // The first CPU reading primes the counters; usage is meaningful from the next one.
        system.refresh_cpu_usage();
        system.refresh_memory();
        LoadMeter { system }
    }

    pub(crate) fn logical_cores(&self) -> f64 {
        match self.system.cpus().len() {
            0 => std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            n => n as f64,
        }
    }

    pub(crate) fn total_memory_mb(&self) -> f64 {
        self.system.total_memory() as f64 / (1024.0 * 1024.0)
    }

    /// Whole-host CPU and memory use now, in percent.
    pub(crate) fn measure(&mut self) -> Load {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let total = self.system.total_memory();
        let memory_percent = if total == 0 {
            0.0
        } else {
            self.system.used_memory() as f64 * 100.0 / total as f64
        };
        Load {
            cpu_percent: f64::from(self.system.global_cpu_usage()),
            memory_percent,
        }
    }
}

/// Sends one heartbeat saying `status`, and cancels the runs the answer names.
pub(crate) async fn send_heartbeat(
    shared: &Shared,
    status: AgentState,
) -> Result<HeartbeatResponse, CallError> {
    let request = heartbeat_request(shared, status);
    let response = shared.client.heartbeat(&request).await?;
    shared.commands.delivered(&request.command_results);
    for run_id in &response.cancel {
        shared.cancel_run(*run_id);
    }
    shared.commands.handle(&response.commands);
    Ok(response)
}

fn heartbeat_request(shared: &Shared, status: AgentState) -> HeartbeatRequest {
    let current_load = match shared.load.lock() {
        Ok(mut meter) => meter.measure(),
        Err(poisoned) => poisoned.into_inner().measure(),
    };
    // `running` before `finished`: a run moves from the first to the second (outbox write,
    // then removal from the table), so reading in this order never misses it.
    let running = shared.runs.ids();
    let finished = shared.outbox.ids();
    HeartbeatRequest {
        node_id: shared.node_id.clone(),
        status,
        resources: shared.capacity,
        current_load,
        hostname: Some(shared.hostname.clone()),
        node_type: Some(shared.config.node_type_or_default().to_string()),
        zone: shared.config.zone.clone(),
        version: Some(env!("CARGO_PKG_VERSION").to_string()),
        running,
        finished,
        sandbox: Some(shared.protections.clone()),
        executor: Some(shared.executor_name.to_string()),
        command_results: shared.commands.outcomes(),
        owner_load: shared
            .owner_load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|owner| Load {
                cpu_percent: owner.cpu_percent,
                memory_percent: owner.memory_percent,
            }),
        paused_reason: match status {
            AgentState::Paused => shared.paused_reason(),
            _ => None,
        },
    }
}

/// Heartbeats every `heartbeat_interval` until `stop`, saying idle, busy, paused or draining.
pub(crate) async fn heartbeat_until_stopped(shared: Arc<Shared>, stop: CancellationToken) {
    let period = shared.config.heartbeat_interval;
    // The supervisor sends the first heartbeat itself (before its first pull).
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = FailureLog::new("heartbeat");
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let status = shared.current_state();
        let sent = tokio::select! {
            () = stop.cancelled() => return,
            sent = send_heartbeat(&shared, status) => sent,
        };
        match sent {
            Ok(_) => {
                debug!(?status, "heartbeat sent");
                failures.succeeded();
            }
            Err(err) => failures.failed(&err),
        }
    }
}
