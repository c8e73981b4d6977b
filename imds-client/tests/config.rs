//! Settings precedence, table-driven from `tests/data/config-precedence.json`
//! (each case says in `docs` what it shows): builder, then environment, then
//! the shared config file, then defaults.

use std::collections::HashMap;

use imds_client::ImdsClient;
use imds_client::config::{EndpointMode, Env};
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
