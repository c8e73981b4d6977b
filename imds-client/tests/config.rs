//! Settings precedence, table-driven from `tests/data/config-precedence.json`
//! (each case says in `docs` what it shows): builder, then environment, then
//! the shared config file, then defaults. And no value, from any source,
//! panics: property tests over strings, floats and integers show each is
//! accepted or refused with an error naming the setting and its range.

use std::collections::HashMap;
use std::time::Duration;

use imds_client::config::{EndpointMode, Env};
use imds_client::{ErrorKind, ImdsClient};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    docs: String,
    env: HashMap<String, String>,
    config_file: Option<String>,
    #[serde(default)]
    builder: Builder,
    expected: Expected,
}

#[derive(Deserialize, Default)]
struct Builder {
    endpoint: Option<String>,
    endpoint_mode: Option<String>,
}

#[derive(Deserialize)]
struct Expected {
    endpoint: Option<String>,
    error_contains: Option<String>,
}

#[test]
fn endpoint_precedence_cases() {
    let cases: Vec<Case> =
        serde_json::from_str(include_str!("data/config-precedence.json")).expect("valid test data");
    assert!(cases.len() >= 10);
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut env = case.env.clone();
        if let Some(text) = &case.config_file {
            let path = dir.path().join("config");
            std::fs::write(&path, text).unwrap();
            env.insert("AWS_CONFIG_FILE".into(), path.display().to_string());
        }
        let mut builder = ImdsClient::builder().env(Env::from_pairs(env));
        if let Some(endpoint) = &case.builder.endpoint {
            builder = builder.endpoint(endpoint).unwrap();
        }
        if let Some(mode) = &case.builder.endpoint_mode {
            builder = builder.endpoint_mode(EndpointMode::parse(mode, "test").unwrap());
        }
        match (builder.build(), &case.expected) {
            (
                Ok(client),
                Expected {
                    endpoint: Some(want),
                    ..
                },
            ) => {
                assert_eq!(client.endpoint(), want, "{}", case.docs)
            }
            (
                Err(err),
                Expected {
                    error_contains: Some(want),
                    ..
                },
            ) => {
                assert!(
                    err.to_string().contains(want.as_str()),
                    "{}: {err}",
                    case.docs
                )
            }
            (Ok(client), _) => panic!(
                "{}: expected an error, got {}",
                case.docs,
                client.endpoint()
            ),
            (Err(err), _) => panic!("{}: unexpected error {err}", case.docs),
        }
    }
}

/// The settings read from the environment, each with its config-file key.
const SETTINGS: &[(&str, Option<&str>)] = &[
    ("AWS_EC2_METADATA_DISABLED", None),
    (
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        Some("ec2_metadata_service_endpoint"),
    ),
    (
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
        Some("ec2_metadata_service_endpoint_mode"),
    ),
    (
        "AWS_EC2_METADATA_V1_DISABLED",
        Some("ec2_metadata_v1_disabled"),
    ),
    (
        "AWS_METADATA_SERVICE_TIMEOUT",
        Some("metadata_service_timeout"),
    ),
    (
        "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
        Some("metadata_service_num_attempts"),
    ),
    ("AWS_EC2_INSTANCE_PROFILE_NAME", None),
    ("AWS_CONFIG_FILE", None),
    ("AWS_PROFILE", None),
];

/// Strings, floats (NaN, infinities, subnormals, 1e300, negatives) and
/// integers, written every way a user might.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,12}",
        any::<f64>().prop_map(|f| f.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        any::<i128>().prop_map(|i| i.to_string()),
        prop::sample::select(vec![
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "1e300",
            "-1e300",
            "1e20",
            "1e30",
            "5e-324",
            "-0",
            "0",
            "-1",
            "",
            " ",
            "0.0001",
            "3600.5",
            "4294967296",
            "21",
            "1",
            "20",
            "true",
            "IPv6",
            "http://[::1",
            "http://",
            "\u{0}",
            ".",
            "/",
            "/dev/null",
            "http://127.0.0.1:1/%zz?#",
        ])
        .prop_map(String::from),
    ]
}

/// `Ok`, or an `InvalidConfiguration` naming `setting`; anything else fails.
fn named_error(
    result: Result<ImdsClient, imds_client::Error>,
    setting: &str,
) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(err) => match err.kind() {
            ErrorKind::InvalidConfiguration {
                setting: named,
                reason,
            } if named == setting && !reason.is_empty() => Ok(()),
            _ => Err(format!("expected an error naming {setting}, got {err:?}")),
        },
    }
}

proptest! {
    #[test]
    fn any_environment_value_builds_or_is_an_error_naming_the_variable(
        index in 0..SETTINGS.len(),
        value in hostile_value(),
    ) {
        let (var, _) = SETTINGS[index];
        let result = ImdsClient::builder().env(Env::from_pairs([(var, value.clone())])).build();
        named_error(result, var).map_err(|e| TestCaseError::fail(format!("{var}={value:?}: {e}")))?;
    }

    #[test]
    fn any_config_file_value_builds_or_is_an_error_naming_the_key(
        index in 0..SETTINGS.len(),
        value in hostile_value().prop_filter("one line", |v| !v.contains(['\n', '\r'])),
    ) {
        let Some(key) = SETTINGS[index].1 else { return Ok(()) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, format!("[default]\n{key} = {value}\n")).unwrap();
        let env = Env::from_pairs([("AWS_CONFIG_FILE", path.display().to_string())]);
        let result = ImdsClient::builder().env(env).build();
        named_error(result, key).map_err(|e| TestCaseError::fail(format!("{key} = {value:?}: {e}")))?;
    }

    #[test]
    fn a_timeout_is_accepted_exactly_from_a_millisecond_to_an_hour(seconds in any::<f64>()) {
        let result = ImdsClient::builder()
            .env(Env::from_pairs([("AWS_METADATA_SERVICE_TIMEOUT", seconds.to_string())]))
            .build();
        if seconds.is_finite() && (0.0011..=3599.9).contains(&seconds) {
            prop_assert!(result.is_ok(), "{seconds}: {:?}", result.err());
        } else if !(0.0009..=3600.1).contains(&seconds) {
            // NaN and the infinities are outside every range too.
            let err = result.expect_err("refused");
            let text = err.to_string();
            prop_assert!(
                text.contains("AWS_METADATA_SERVICE_TIMEOUT") && text.contains("0.001") && text.contains("3600"),
                "{seconds}: the error names the variable and the range: {text}"
            );
        }
    }

    #[test]
    fn attempts_are_accepted_exactly_from_1_to_20(attempts in any::<i64>()) {
        let result = ImdsClient::builder()
            .env(Env::from_pairs([("AWS_METADATA_SERVICE_NUM_ATTEMPTS", attempts.to_string())]))
            .build();
        if (1..=20).contains(&attempts) {
            prop_assert!(result.is_ok(), "{attempts}: {:?}", result.err());
        } else {
            let text = result.expect_err("refused").to_string();
            prop_assert!(
                text.contains("AWS_METADATA_SERVICE_NUM_ATTEMPTS") && text.contains("1 to 20"),
                "{attempts}: {text}"
            );
        }
    }

    #[test]
    fn any_builder_value_builds_or_is_an_error_naming_the_method(
        secs in prop_oneof![any::<u64>(), 0..4000u64],
        nanos in 0..1_000_000_000u32,
        attempts in any::<u32>(),
        profile in any::<String>(),
    ) {
        let d = Duration::new(secs, nanos);
        let base = || ImdsClient::builder().env(Env::empty());
        let in_hour = (Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&d);
        for (setting, result, accepted) in [
            ("connect_timeout", base().connect_timeout(d).build(), in_hour),
            ("read_timeout", base().read_timeout(d).build(), in_hour),
            ("unreachable_memo", base().unreachable_memo(d).build(), d <= Duration::from_secs(3600)),
            ("token_ttl", base().token_ttl(d).build(), (1..=21_600).contains(&secs) && nanos == 0),
            ("max_attempts", base().max_attempts(attempts).build(), (1..=20).contains(&attempts)),
        ] {
            prop_assert_eq!(result.is_ok(), accepted, "{} with {:?} / {}", setting, d, attempts);
            named_error(result, setting).map_err(TestCaseError::fail)?;
        }
        named_error(base().profile_name(profile.clone()).build(), "profile_name").map_err(TestCaseError::fail)?;
        match base().endpoint(&profile) {
            Ok(builder) => prop_assert!(builder.build().is_ok(), "endpoint {:?}", profile),
            Err(err) => prop_assert!(
                matches!(err.kind(), ErrorKind::InvalidConfiguration { setting, .. } if setting == "endpoint"),
                "{:?}", err
            ),
        }
    }
}

#[test]
fn a_config_file_that_is_not_a_small_regular_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'#'; 2 * 1024 * 1024]).unwrap();
    let not_utf8 = dir.path().join("latin1");
    std::fs::write(&not_utf8, b"[default]\nregion = caf\xe9\n").unwrap();
    // A FIFO nobody writes to: opening it would wait forever.
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (path, why) in [
        (fifo, "is not a regular file"),
        (dir.path().to_path_buf(), "is a directory"),
        ("/dev/zero".into(), "is larger than 1 MiB"),
        (big, "is larger than 1 MiB"),
        (not_utf8, "is not UTF-8 text"),
    ] {
        let err = ImdsClient::builder()
            .env(Env::from_pairs([(
                "AWS_CONFIG_FILE",
                path.display().to_string(),
            )]))
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("AWS_CONFIG_FILE") && text.contains(why),
            "{}: expected an error naming AWS_CONFIG_FILE saying it {why}, got {text}",
            path.display()
        );
    }
    // The usual way to say "no config file" still works.
    ImdsClient::builder()
        .env(Env::from_pairs([("AWS_CONFIG_FILE", "/dev/null")]))
        .build()
        .expect("AWS_CONFIG_FILE=/dev/null is an empty config");
}

/// The example program, run in a child process with a hostile environment.
#[path = "../../examples/fetch_credentials.rs"]
mod fetch_credentials_example;

/// Set in the child: run the example and report its exit code.
const EXAMPLE_CHILD: &str = "IMDS_CLIENT_TEST_RUN_EXAMPLE";

#[test]
fn the_example_exits_with_a_clear_error_on_any_bad_setting() {
    if std::env::var_os(EXAMPLE_CHILD).is_some() {
        let code = fetch_credentials_example::main();
        println!("example exit code: {code:?}");
        return;
    }
    let cases = [
        ("AWS_METADATA_SERVICE_TIMEOUT", "1e20", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "NaN", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "-inf", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "1e300", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "5e-324", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "-1", "0.001 to 3600"),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "0", "1 to 20"),
        (
            "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
            "99999999999",
            "1 to 20",
        ),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "-3", "1 to 20"),
    ];
    let home = tempfile::tempdir().unwrap();
    let failure = format!("example exit code: {:?}", std::process::ExitCode::FAILURE);
    for (var, value, range) in cases {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_example_exits_with_a_clear_error_on_any_bad_setting",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_clear()
            .env("HOME", home.path())
            // Loopback, should the value ever be accepted: never 169.254.169.254.
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
            .env(EXAMPLE_CHILD, "1")
            .env(var, value)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains(&failure),
            "{var}={value}: expected the example to exit 1, not panic; status {:?}\n{stdout}\n{stderr}",
            output.status
        );
        assert!(
            stderr.contains(&format!("error: invalid value for {var}")) && stderr.contains(range),
            "{var}={value}: expected an error naming {var} and {range}, got:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
