//! Child processes: the real `towerstream` binary started as a trainer or a replica, stopped
//! with SIGTERM (a graceful stop whose exit code is checked) or SIGKILL (a crash).
//!
//! A child is up when it prints `... API on http://ADDR` on stdout. Its stderr goes to a log
//! file in the scenario directory; the report counts `panicked` in every such log.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How a child ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exit {
    /// `trainer#2`, `replica#1`, ...
    pub name: String,
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// How the harness stopped it: `term`, `kill9`, or `exited` on its own.
    pub stopped_by: &'static str,
}

impl Exit {
    /// `0`, `1`, `SIGKILL`, `SIGTERM`...
    pub fn short(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(9)) => "SIGKILL".into(),
            (None, Some(15)) => "SIGTERM".into(),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "?".into(),
        }
    }

    /// A graceful stop must end with code 0; a kill -9 is expected to end by the signal.
    pub fn as_expected(&self) -> bool {
        match self.stopped_by {
            "kill9" => self.signal == Some(9),
            _ => self.code == Some(0),
        }
    }
}

/// A running child (killed with SIGKILL if dropped without being stopped).
pub struct Proc {
    /// Its name in the report.
    pub name: String,
    /// Where its API listens.
    pub addr: SocketAddr,
    /// Its stderr log.
    pub log: PathBuf,
    child: Option<Child>,
}

/// What to start.
pub struct Spec<'a> {
    /// The `towerstream` binary.
    pub bin: &'a Path,
    /// `run`, `train` or `serve`.
    pub command: &'a str,
    /// The scenario's configuration file.
    pub config: &'a Path,
    /// Extra `--set key=value` overrides.
    pub sets: Vec<String>,
    /// Name in the report.
    pub name: String,
    /// Directory for its logs.
    pub dir: &'a Path,
}

/// Starts a child and waits until its API is up (60 s at most).
pub async fn start(spec: Spec<'_>) -> anyhow::Result<Proc> {
    let log = spec.dir.join(format!("{}.stderr.log", spec.name));
    let out_path = spec.dir.join(format!("{}.stdout.log", spec.name));
    let stderr =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(spec.bin);
    cmd.arg("--config").arg(spec.config);
    for s in &spec.sets {
        cmd.arg("--set").arg(s);
    }
    cmd.arg(spec.command)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    // The scenario's file is the whole configuration: nothing from the harness's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("TOWERSTREAM_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.bin.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || copy_stdout(stdout, &out_path, tx));
    let mut proc = Proc {
        name: spec.name,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        log,
        child: Some(child),
    };
    match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(addr)) => proc.addr = addr,
        _ => anyhow::bail!(
            "{} did not print its API address within 60 s; see {}",
            proc.name,
            proc.log.display()
        ),
    }
    Ok(proc)
}

/// Copies the child's stdout to a file, sending the API address when it appears.
fn copy_stdout(
    stdout: std::process::ChildStdout,
    path: &Path,
    tx: tokio::sync::oneshot::Sender<SocketAddr>,
) {
    let mut tx = Some(tx);
    let mut out = std::fs::File::create(path).ok();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(addr) = api_addr(&line) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(addr);
            }
        }
        if let Some(f) = out.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn api_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("API on http://").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this harness started and has not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn exit_of(name: &str, status: std::process::ExitStatus, stopped_by: &'static str) -> Exit {
    use std::os::unix::process::ExitStatusExt as _;
    Exit {
        name: name.to_owned(),
        code: status.code(),
        signal: status.signal(),
        stopped_by,
    }
}

/// Waits for `child` for at most `grace`; SIGKILL after that.
fn reap(mut child: Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                eprintln!(
                    "[chaos] pid {} ignored SIGTERM for {grace:?}; killing it",
                    child.id()
                );
                signal(&child, libc::SIGKILL);
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

impl Proc {
    async fn end(mut self, sig: i32, grace: Duration, stopped_by: &'static str) -> Exit {
        let name = self.name.clone();
        let Some(child) = self.child.take() else {
            return Exit {
                name,
                code: None,
                signal: None,
                stopped_by,
            };
        };
        signal(&child, sig);
        let status = tokio::task::spawn_blocking(move || reap(child, grace))
            .await
            .ok()
            .flatten();
        match status {
            Some(s) => exit_of(&name, s, stopped_by),
            None => Exit {
                name,
                code: None,
                signal: None,
                stopped_by,
            },
        }
    }

    /// `kill -9`: the crash.
    pub async fn kill9(self) -> Exit {
        self.end(libc::SIGKILL, Duration::from_secs(10), "kill9")
            .await
    }

    /// SIGTERM, then up to `grace` for the graceful stop; SIGKILL after that.
    pub async fn term(self, grace: Duration) -> Exit {
        self.end(libc::SIGTERM, grace, "term").await
    }

    /// Whether it has exited on its own (and how); it stays reapable by `term`.
    pub fn exited(&mut self) -> Option<Exit> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(s)) => Some(exit_of(&self.name, s, "exited")),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// Occurrences of `panicked` in the logs.
pub fn panics(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .map(|t| t.matches("panicked").count() as u64)
                .unwrap_or(0)
        })
        .sum()
}

/// The error a child printed when it exited with one (`Error: ...` and its causes).
pub fn final_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let start = text.find("\nError: ")?;
    let mut parts = Vec::new();
    for line in text[start + 1..].lines() {
        let l = line.trim();
        if l.starts_with("Stack backtrace") {
            break;
        }
        if l.is_empty() || l == "Caused by:" {
            continue;
        }
        parts.push(l.trim_start_matches("Error: ").to_owned());
    }
    Some(parts.join(" / "))
}
