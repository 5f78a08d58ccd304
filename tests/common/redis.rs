//! A real `redis-server` (Debian's package) for the cluster tests, on a
//! Unix socket in the test's own directory: no port to pick, and the same
//! path again after a restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::WAIT;

pub struct Redis {
    child: Option<Child>,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Redis {
    /// Starts redis-server with its data (append-only file, fsync on every
    /// write, as a store of certificates should run) in `dir`.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Self {
            child: None,
            dir: dir.to_owned(),
            socket: dir.join("redis.sock"),
        };
        r.resume();
        r
    }

    /// The URL edges use.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// Starts it again on the same socket and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis is running");
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--dir"])
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--logfile",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (CI installs Debian's redis-server)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent
                    && line
                        .to_ascii_lowercase()
                        .contains("ready to accept connections")
                {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        if rx.recv_timeout(WAIT).is_err() {
            let _ = child.kill();
            panic!("redis-server never became ready");
        }
        self.child = Some(child);
    }

    /// Stops it (SIGTERM, as `systemctl stop` does) and waits for it.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("redis is running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
    }

    /// `redis-cli` against it; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
