//! The named scenarios, one function each; [`ALL`] is the order of a full run.

pub mod faults;
pub mod join;
pub mod rates;
pub mod replicas;
pub mod values;

use std::future::Future;
use std::pin::Pin;

use crate::report::Report;
use crate::stage::Env;

/// A scenario's future.
pub type Run<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Report>> + 'a>>;

/// Every scenario by its command-line name, in the order they run.
pub const ALL: [&str; 10] = [
    "trickle",
    "bursts",
    "single",
    "steady",
    "kill9",
    "broker-restart",
    "rebalance",
    "lagging-partition",
    "bad-values",
    "replica-restart",
];

/// The scenario called `name`.
pub fn run<'a>(name: &str, env: &'a Env) -> Option<Run<'a>> {
    Some(match name {
        "trickle" => Box::pin(rates::trickle(env)),
        "bursts" => Box::pin(rates::bursts(env)),
        "single" => Box::pin(rates::single(env)),
        "steady" => Box::pin(rates::steady(env)),
        "kill9" => Box::pin(faults::kill9(env)),
        "broker-restart" => Box::pin(faults::broker_restart(env)),
        "rebalance" => Box::pin(faults::rebalance(env)),
        "lagging-partition" => Box::pin(join::lagging_partition(env)),
        "bad-values" => Box::pin(values::bad_values(env)),
        "replica-restart" => Box::pin(faults::replica_restart(env)),
        _ => return None,
    })
}
