//! `imds-agent mock-imds`: the emulator as a standalone process.

use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent};

#[tokio::test]
async fn mock_imds_serves_a_role_and_stops_cleanly_on_sigterm() {
    let mut cmd = agent();
    cmd.args(["mock-imds", "--listen", "127.0.0.1:0", "--role", "e2e-role"]);
    let mut running = Running::start(cmd);
    let first = running.line();
    let endpoint = first
        .strip_prefix("IMDS emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    eqnice!("role attached: e2e-role", running.line());
    let sts = running.line();
    let sts = sts
        .strip_prefix("AWS_ENDPOINT_URL_STS=http://127.0.0.1:")
        .unwrap_or_else(|| panic!("expected the STS emulator's endpoint on line 3, saw {sts}"))
        .to_owned();
    let sts_answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{sts}/_mock/calls"))
        .send()
        .await
        .unwrap();
    eqnice!(200, sts_answer.status().as_u16());

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = http
        .put(format!("{endpoint}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let role = http
        .get(format!(
            "{endpoint}/latest/meta-data/iam/security-credentials/"
        ))
        .header("X-aws-ec2-metadata-token", &token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eqnice!("e2e-role", role);

    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn bad_flags_are_a_clear_error_with_exit_code_2() {
    let out = agent()
        .args(["mock-imds", "--listen", "not-an-address"])
        .output()
        .unwrap();
    eqnice!(Some(2), out.status.code());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen"), "{stderr}");
}

#[test]
fn help_explains_the_control_surface() {
    let out = agent().args(["mock-imds", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("/_mock/role"), "{help}");
    assert!(help.contains("--role"), "{help}");
}
