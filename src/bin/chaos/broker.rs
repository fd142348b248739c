//! The harness's own broker, stopped and started through `scripts/kafka` with its own ports
//! (never the broker of the test suite).

use std::path::PathBuf;

/// How to control the broker.
#[derive(Debug, Clone)]
pub struct Broker {
    /// `scripts/kafka`.
    pub script: PathBuf,
    /// Client port.
    pub port: u16,
    /// Controller port.
    pub controller_port: u16,
}

impl Broker {
    /// `host:port` for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn run(&self, action: &str) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(&self.script);
        cmd.arg(action)
            .env("TS_KAFKA_PORT", self.port.to_string())
            .env("TS_KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("TS_KAFKA_BROKERS", self.brokers());
        let status = tokio::task::spawn_blocking(move || cmd.status()).await??;
        anyhow::ensure!(status.success(), "scripts/kafka {action} failed: {status}");
        Ok(())
    }

    /// Stops the broker (returns once its process has exited).
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.run("stop").await
    }

    /// Starts the broker (returns once a produce succeeds).
    pub async fn start(&self) -> anyhow::Result<()> {
        self.run("start").await
    }
}
