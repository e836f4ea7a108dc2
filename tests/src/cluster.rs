//! Real `crm-host` processes for tests of several processes on one database: start them with a
//! configuration in `CRM_` variables, wait until they answer, stop them gracefully or with
//! `kill -9`, and read what they logged.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `crm-host` binary: `CRM_HOST_BIN`, else the one cargo built beside this test binary
/// (`target/<profile>/crm-host`).
pub fn host_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CRM_HOST_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/e2e-<hash> → target/<profile>/crm-host
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in a cargo target directory")?;
    let binary = profile_dir.join("crm-host");
    if !binary.exists() {
        bail!(
            "{} does not exist: build it first (`cargo build -p crm-host`, which `cargo nextest run --workspace` does) or set CRM_HOST_BIN",
            binary.display()
        );
    }
    Ok(binary)
}

/// A free loopback port (bound and released; the process binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// One running `crm-host serve`.
pub struct HostProcess {
    /// A name for messages (`worker-1`).
    pub name: String,
    /// Where it listens.
    pub port: u16,
    /// Its process id.
    pub pid: u32,
    child: Option<Child>,
    log: PathBuf,
}

impl HostProcess {
    /// Starts `crm-host serve` with `env` (the `CRM_` configuration) and waits until `/health`
    /// answers 200.
    pub async fn start(name: &str, env: &[(String, String)]) -> anyhow::Result<Self> {
        let binary = host_binary()?;
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!(
            "crm-host-{name}-{port}-{:08x}.log",
            rand::random::<u32>()
        ));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&binary)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CRM_BIND", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id();
        let mut process = Self {
            name: name.to_string(),
            port,
            pid,
            child: Some(child),
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = process.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{name} exited with {status} before answering; its log:\n{}",
                    process.log_tail(40)
                );
            }
            let health = http
                .get(format!("http://127.0.0.1:{port}/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(process);
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not answer on port {port} within 60 s; its log:\n{}",
                    process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The prefix of this process's lease owner names (`<pid>-`).
    pub fn lease_owner_prefix(&self) -> String {
        format!("{}-", self.pid)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9`: the process ends at once, in the middle of whatever it was doing.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (at most 60 s) for a graceful exit; returns whether it exited 0.
    pub async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Runs `<TEST_PG_CTL> <action>` (e.g. `pg_ctlcluster 15 main stop`), the command that stops and
/// starts the PostgreSQL server the tests use; `None` when `TEST_PG_CTL` is not set.
pub fn pg_ctl(action: &str) -> Option<anyhow::Result<()>> {
    let command = std::env::var("TEST_PG_CTL").ok()?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{command} {action}"))
        .status();
    Some(match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(anyhow::anyhow!("`{command} {action}` exited with {s}")),
        Err(e) => Err(anyhow::anyhow!("`{command} {action}` did not run: {e}")),
    })
}
