//! Helpers to run the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

/// The `imds-agent` binary cargo built for these tests.
pub(crate) fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imds-agent"));
    cmd.env_remove("RUST_LOG").env("IMDS_AGENT_LOG", "info");
    cmd
}

/// A running agent process, stopped with SIGKILL if a test forgets it.
pub(crate) struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    /// Starts `cmd` with stdout piped.
    pub(crate) fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting imds-agent");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    /// The next line of standard output.
    pub(crate) fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading stdout");
        line.trim_end().to_owned()
    }

    /// Sends `signal` and waits (bounded) for the process to exit.
    pub(crate) fn stop_with(mut self, signal: Signal) -> ExitStatus {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        kill_process(pid, signal).expect("signalling imds-agent");
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        panic!("imds-agent did not exit within 5 s of {signal:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
