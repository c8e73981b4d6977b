//! Tests of the INI merge against what other tools write, checked with an
//! independent reader: the AWS SDK for Rust's profile-file credentials
//! provider, as applications use it.

use std::error::Error as _;

// The non-deprecated names live in aws-runtime, which is not a dependency.
use aws_config::profile::ProfileFileCredentialsProvider;
#[allow(deprecated)]
use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
use aws_credential_types::provider::ProvideCredentials;
use proptest::prelude::*;

use super::{replace_section, section_values};

const BODY: &str = "# managed by imds-agent\naws_access_key_id = AKOURS\naws_secret_access_key = SOURS\naws_session_token = TOURS\n";

fn body_with(eol: &str) -> String {
    BODY.replace('\n', eol)
}

fn our_values() -> Vec<(String, String)> {
    [
        ("aws_access_key_id", "AKOURS"),
        ("aws_secret_access_key", "SOURS"),
        ("aws_session_token", "TOURS"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec()
}

fn write(existing: &[u8], profile: &str) -> Vec<u8> {
    replace_section(existing, profile, Some(BODY)).unwrap_or_else(|e| {
        panic!(
            "expected {:?} to be merged, got: {e:#}",
            String::from_utf8_lossy(existing)
        )
    })
}

fn refusal(existing: &[u8]) -> String {
    match replace_section(existing, "default", Some(BODY)) {
        Ok(out) => panic!(
            "expected {:?} to be refused, got {:?}",
            String::from_utf8_lossy(existing),
            String::from_utf8_lossy(&out)
        ),
        Err(e) => format!("{e:#}"),
    }
}

/// What the AWS SDK for Rust makes of a credentials file.
#[derive(Debug, PartialEq, Eq)]
enum Sdk {
    /// The file is not UTF-8 (the SDK reads it as empty) or does not parse.
    Unreadable,
    /// The credentials the SDK resolves for the profile, or none.
    Credentials(Result<(String, String, Option<String>), ()>),
}

#[allow(deprecated)]
fn sdk(file: &[u8], profile: &str) -> Sdk {
    if std::str::from_utf8(file).is_err() {
        return Sdk::Unreadable;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials");
    std::fs::write(&path, file).unwrap();
    let provider = ProfileFileCredentialsProvider::builder()
        .profile_files(
            ProfileFiles::builder()
                .with_file(ProfileFileKind::Credentials, &path)
                .build(),
        )
        .profile_name(profile)
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(provider.provide_credentials()) {
        Ok(c) => Sdk::Credentials(Ok((
            c.access_key_id().to_owned(),
            c.secret_access_key().to_owned(),
            c.session_token().map(str::to_owned),
        ))),
        Err(e) => {
            // The provider keeps the parse error only as text.
            let cause = e.source().map(ToString::to_string).unwrap_or_default();
            if cause.contains("could not parse profile file") {
                Sdk::Unreadable
            } else {
                Sdk::Credentials(Err(()))
            }
        }
    }
}

fn sdk_ours() -> Sdk {
    Sdk::Credentials(Ok(("AKOURS".into(), "SOURS".into(), Some("TOURS".into()))))
}

fn sdk_static(key: &str, secret: &str) -> Sdk {
    Sdk::Credentials(Ok((key.into(), secret.into(), None)))
}

#[test]
fn replaces_only_our_section_and_keeps_everything_else() {
    let before =
        "# my notes\n[other]\naws_access_key_id = X\n\n[ default ]\nold = 1\n; c\n[x]\nk = v";
    let after = write(before.as_bytes(), "default");
    assert_eq!(
        String::from_utf8(after).unwrap(),
        format!("# my notes\n[other]\naws_access_key_id = X\n\n[default]\n{BODY}[x]\nk = v")
    );
}

#[test]
fn appends_when_absent_and_removes_only_ours() {
    assert_eq!(
        write(b"", "default"),
        format!("[default]\n{BODY}").as_bytes()
    );
    assert_eq!(
        write(b"[a]\nk=v", "default"),
        format!("[a]\nk=v\n\n[default]\n{BODY}").as_bytes()
    );
    assert_eq!(
        write(b"[a]\nk=v\n\n", "default"),
        format!("[a]\nk=v\n\n[default]\n{BODY}").as_bytes()
    );
    let removed = replace_section(b"[a]\nk=v\n[default]\nx=1\n[b]\ny=2\n", "default", None);
    assert_eq!(removed.unwrap(), b"[a]\nk=v\n[b]\ny=2\n");
}

#[test]
fn a_bom_is_kept_and_the_default_after_it_is_ours() {
    let before = b"\xEF\xBB\xBF[default]\nrole_arn = arn:aws:iam::1:role/x\n[dev]\nk = v\n";
    let after = write(before, "default");
    assert_eq!(
        after,
        [
            &b"\xEF\xBB\xBF[default]\n"[..],
            BODY.as_bytes(),
            b"[dev]\nk = v\n"
        ]
        .concat(),
        "{}",
        String::from_utf8_lossy(&after)
    );
    assert_eq!(section_values(&after, "default"), Some(our_values()));

    let appended = write(b"\xEF\xBB\xBF[dev]\nk = v\n", "default");
    assert_eq!(
        appended,
        [
            &b"\xEF\xBB\xBF[dev]\nk = v\n\n[default]\n"[..],
            BODY.as_bytes()
        ]
        .concat()
    );
    assert_eq!(
        write(b"\xEF\xBB\xBF", "default"),
        [&b"\xEF\xBB\xBF[default]\n"[..], BODY.as_bytes()].concat()
    );
}

#[test]
fn a_cr_only_file_is_split_like_botocore_and_keeps_its_lines() {
    // botocore reads a lone CR as a line break: `[default]` here is a profile.
    let before = b"[dev]\rk = v\r[default]\rrole_arn = arn:aws:iam::1:role/x\r[b]\rx = 1\r";
    let after = write(before, "default");
    let cr = body_with("\r");
    assert_eq!(
        after,
        [
            &b"[dev]\rk = v\r[default]\r"[..],
            cr.as_bytes(),
            b"[b]\rx = 1\r"
        ]
        .concat(),
        "{}",
        String::from_utf8_lossy(&after).escape_debug()
    );
    assert_eq!(section_values(&after, "default"), Some(our_values()));
    assert_eq!(
        write(&after, "default"),
        after,
        "a second write is the same"
    );

    let appended = write(b"[dev]\rk = v", "default");
    assert_eq!(
        appended,
        [&b"[dev]\rk = v\r\r[default]\r"[..], cr.as_bytes()].concat()
    );
    let removed = replace_section(&after, "default", None).unwrap();
    assert_eq!(removed, b"[dev]\rk = v\r[b]\rx = 1\r");
}

#[test]
fn a_lone_carriage_return_in_an_lf_file_is_kept_unless_next_to_our_section() {
    // Far from ours: the owner's business.
    let before = b"[b]\nk = v\rx = 1\n[default]\nold = 1\n";
    assert_eq!(
        write(before, "default"),
        [&b"[b]\nk = v\rx = 1\n[default]\n"[..], BODY.as_bytes()].concat()
    );
    // Just before our header: the Rust SDK reads `k = v\r[default]` as one line.
    let err = refusal(b"[a]\nk = v\r[default]\nold = 1\n");
    assert!(
        err.contains("line 2: a carriage return without a line feed"),
        "{err}"
    );
    // Inside ours: the Rust SDK reads `[a]` as part of our value, botocore as a header.
    let err = refusal(b"[default]\nold = 0\r[a]\rk = v\n");
    assert!(
        err.contains("line 2: a carriage return without a line feed"),
        "{err}"
    );
    // At the end, before a section we append: CRLF ends the line for the Rust
    // SDK without changing its value (`v\r`), and is a blank line for botocore.
    let after = write(b"[a]\nk = v\r", "default");
    assert_eq!(
        after,
        [&b"[a]\nk = v\r\r\n[default]\n"[..], BODY.as_bytes()].concat()
    );
    assert_eq!(write(&after, "default"), after);
}

#[test]
fn a_crlf_file_gets_crlf_lines_and_the_sdk_reads_them() {
    let before = b"[dev]\r\naws_access_key_id = DEV\r\naws_secret_access_key = DEVS\r\n[default]\r\nold = 1\r\n";
    let after = write(before, "default");
    let expected = format!(
        "[dev]\r\naws_access_key_id = DEV\r\naws_secret_access_key = DEVS\r\n[default]\r\n{}",
        body_with("\r\n")
    );
    assert_eq!(String::from_utf8(after.clone()).unwrap(), expected);
    assert_eq!(sdk(&after, "default"), sdk_ours());
    assert_eq!(sdk(&after, "dev"), sdk_static("DEV", "DEVS"));
}

#[test]
fn an_indented_default_botocore_reads_as_a_header_is_replaced() {
    // First in the file: botocore reads a header; the Rust SDK cannot parse the file.
    let before = b"  [default]\nrole_arn = arn:aws:iam::1:role/x\n[dev]\nk = v\n";
    assert_eq!(sdk(before, "dev"), Sdk::Unreadable);
    let after = write(before, "default");
    assert_eq!(
        after,
        [&b"[default]\n"[..], BODY.as_bytes(), b"[dev]\nk = v\n"].concat()
    );
    // Right after a header: a header for botocore too.
    let after = write(b"[dev]\n\t[default]\nold = 1\n", "default");
    assert_eq!(
        after,
        [&b"[dev]\n[default]\n"[..], BODY.as_bytes()].concat()
    );
}

#[test]
fn an_indented_default_under_an_option_is_refused() {
    // botocore and the Rust SDK read line 3 as part of `k`, other readers as [default].
    let err = refusal(b"[dev]\nk = v\n  [default]\nrole_arn = x\n");
    assert!(
        err.contains("line 3") && err.contains("indented [default]"),
        "{err}"
    );
    assert!(err.contains("remove the leading whitespace"), "{err}");
}

#[test]
fn indented_headers_around_our_section_are_refused() {
    // A `[dev]`-like line continuing a value inside ours: deleting it would
    // delete what other readers call [dev].
    let err = refusal(b"[default]\nold = 1\n  [dev]\nk = v\n");
    assert!(
        err.contains("line 3") && err.contains("inside [default]"),
        "{err}"
    );
    // An indented header ending ours: after our rewrite botocore would read it
    // as part of our session token.
    let err = refusal(b"[default]\n  [dev]\nk = v\n");
    assert!(
        err.contains("line 2") && err.contains("ends [default]"),
        "{err}"
    );
    // Elsewhere, an indented header is the owner's business.
    let before = b"[dev]\n  [x]\nk = v\n";
    let after = write(before, "default");
    assert!(after.starts_with(before));
}

#[test]
fn non_utf8_bytes_are_kept_in_other_profiles_and_replaced_in_ours() {
    let before = b"[dev]\nk = caf\xE9\n[default]\nold = \xFF\xFE\n[b]\nx = \xC3\n";
    let after = write(before, "default");
    assert_eq!(
        after,
        [
            &b"[dev]\nk = caf\xE9\n[default]\n"[..],
            BODY.as_bytes(),
            b"[b]\nx = \xC3\n"
        ]
        .concat()
    );
    assert_eq!(section_values(&after, "default"), Some(our_values()));

    let before = b"[default]\nold = \xFF\n";
    let after = write(before, "default");
    assert_eq!(after, format!("[default]\n{BODY}").as_bytes());
    assert_eq!(sdk(&after, "default"), sdk_ours(), "valid UTF-8 again");
}

#[test]
fn spaced_and_commented_default_headers_are_ours() {
    for header in [
        "[ default ]",
        "[\tdefault]",
        "[default] ; mine",
        "[default]#x",
        "[default] x",
        "[\u{a0}default]",
    ] {
        let before = format!(
            "[dev]\naws_access_key_id = DEV\naws_secret_access_key = DEVS\n{header}\naws_access_key_id = OLD\naws_secret_access_key = OLDS\nrole_arn = arn:aws:iam::1:role/x\n"
        );
        let after = write(before.as_bytes(), "default");
        assert_eq!(
            String::from_utf8(after.clone()).unwrap(),
            format!(
                "[dev]\naws_access_key_id = DEV\naws_secret_access_key = DEVS\n[default]\n{BODY}"
            ),
            "{header}"
        );
        if sdk(before.as_bytes(), "default") != Sdk::Unreadable {
            assert_eq!(sdk(&after, "default"), sdk_ours(), "{header}");
        }
        assert_eq!(sdk(&after, "dev"), sdk_static("DEV", "DEVS"), "{header}");
    }
}

#[test]
fn profile_default_is_a_config_file_header_and_is_kept() {
    // In a credentials file botocore reads `[profile default]` as a profile
    // named "profile default", and the Rust SDK ignores it: not ours.
    let before = b"[profile default]\naws_access_key_id = P\naws_secret_access_key = PS\n";
    let after = write(before, "default");
    assert_eq!(
        after,
        [&before[..], b"\n[default]\n", BODY.as_bytes()].concat()
    );
    assert_eq!(sdk(&after, "default"), sdk_ours());
}

#[test]
fn duplicates_written_by_a_person_become_one_section() {
    let before = b"[default]\nx = 1\n[a]\naws_access_key_id = A\naws_secret_access_key = AS\n[ default ]\nrole_arn = y\n[default]\n";
    let after = write(before, "default");
    assert_eq!(
        after,
        [
            &b"[default]\n"[..],
            BODY.as_bytes(),
            b"[a]\naws_access_key_id = A\naws_secret_access_key = AS\n"
        ]
        .concat()
    );
    assert_eq!(section_values(&after, "default"), Some(our_values()));
    assert_eq!(sdk(&after, "default"), sdk_ours());
    assert_eq!(sdk(&after, "a"), sdk_static("A", "AS"));
    let dup = b"[default]\nx=1\n[a]\nk=v\n[default]\ny=2\n";
    assert_eq!(
        replace_section(dup, "default", None).unwrap(),
        b"[a]\nk=v\n"
    );
}

#[test]
fn a_defaults_section_is_refused() {
    let err = refusal(b"[dev]\nk = v\n[DEFAULT]\nrole_arn = x\n");
    assert!(err.contains("line 3") && err.contains("[DEFAULT]"), "{err}");
}

#[test]
fn a_header_the_rust_sdk_joins_across_a_carriage_return_is_refused() {
    // Split on `\n` only, line 2 is `[\rdefault]`, which the Rust SDK trims to `default`.
    let err = refusal(b"[dev]\n[\rdefault]\nrole_arn = x\n");
    assert!(
        err.contains("line 2") && err.contains("carriage return"),
        "{err}"
    );
}

#[test]
fn profile_names_every_reader_parses() {
    for bad in ["", " a", "a]", "a#b", "a;b", "a\nb"] {
        assert!(replace_section(b"", bad, Some(BODY)).is_err(), "{bad:?}");
    }
}

#[test]
fn refusals_name_no_value() {
    // A refusal quotes headers only: values may be secrets.
    let err = refusal(b"[default]\naws_secret_access_key = SECRETVALUE\n  [dev]\n");
    assert!(!err.contains("SECRETVALUE"), "{err}");
}

/// One line of a file as people and tools write it.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "[a]", "[b]", "[c]", "[default]", "[ default ]", "[default] ; x", "[profile default]",
            "  [default]", "\t[a]", " [b]", "[DEFAULT]", "[default", "[]", "[\rdefault]",
        ]).prop_map(|s| s.as_bytes().to_vec()),
        4 => (
            prop::sample::select(vec!["aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region", "k"]),
            "[A-Z0-9]{1,4}",
            prop::sample::select(vec!["", " ", "  ", "\t"]),
        ).prop_map(|(k, v, indent)| format!("{indent}{k} = {v}").into_bytes()),
        1 => prop::sample::select(vec!["# note", "; note", "  # x", "", "   ", "junk", "= x"])
            .prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..6),
    ]
}

/// A file of such lines with any mix of line endings, maybe a BOM.
fn file() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop::collection::vec(
            (
                line(),
                prop::sample::select(vec!["\n", "\n", "\r\n", "\r", ""]),
            ),
            0..14,
        ),
    )
        .prop_map(|(bom, lines)| {
            let mut file = if bom {
                b"\xEF\xBB\xBF".to_vec()
            } else {
                Vec::new()
            };
            for (line, eol) in lines {
                file.extend_from_slice(&line);
                file.extend_from_slice(eol.as_bytes());
            }
            file
        })
}

/// `sub` is `full` with only line-break bytes removed.
fn only_line_breaks_added(sub: &[u8], full: &[u8]) -> bool {
    let mut sub = sub.iter().peekable();
    for &b in full {
        if sub.peek() == Some(&&b) {
            sub.next();
        } else if b != b'\n' && b != b'\r' {
            return false;
        }
    }
    sub.next().is_none()
}

fn check_merge(before: &[u8]) -> Result<(), TestCaseError> {
    let Ok(written) = replace_section(before, "default", Some(BODY)) else {
        let err = replace_section(before, "default", Some(BODY)).unwrap_err();
        prop_assert!(format!("{err}").starts_with("line "), "{err}");
        return Ok(());
    };
    // Our keys, exactly once.
    prop_assert_eq!(section_values(&written, "default"), Some(our_values()));
    // Never a write that blocks later ones: writing again changes nothing.
    let again = replace_section(&written, "default", Some(BODY));
    prop_assert_eq!(again.as_deref().ok(), Some(&written[..]));
    // Everything outside our section is the owner's, give or take line breaks.
    let theirs = replace_section(before, "default", None).unwrap();
    let Some((at, len)) = ["\n", "\r\n", "\r"].into_iter().find_map(|eol| {
        let ours = format!("[default]{eol}{}", body_with(eol));
        written
            .windows(ours.len())
            .position(|w| w == ours.as_bytes())
            .map(|at| (at, ours.len()))
    }) else {
        return Err(TestCaseError::fail("our section is not in the output"));
    };
    let rest = [&written[..at], &written[at + len..]].concat();
    prop_assert!(
        only_line_breaks_added(&theirs, &rest),
        "other bytes changed: {:?} -> {:?}",
        String::from_utf8_lossy(&theirs),
        String::from_utf8_lossy(&rest)
    );
    // Removing ours again leaves the same bytes as removing it from the original.
    let removed = replace_section(&written, "default", None).unwrap();
    prop_assert!(only_line_breaks_added(&theirs, &removed));
    prop_assert_eq!(section_values(&removed, "default"), None);
    // The AWS SDK for Rust, if it could read the file, reads ours and the rest
    // as before. (A CR-only file is a single line to it, before and after.)
    let cr_only = before.contains(&b'\r') && !before.contains(&b'\n');
    if !cr_only && sdk(before, "zz-absent") != Sdk::Unreadable {
        prop_assert_eq!(sdk(&written, "default"), sdk_ours());
        for name in ["a", "b", "c"] {
            prop_assert_eq!(sdk(&written, name), sdk(before, name), "profile {}", name);
            prop_assert_eq!(sdk(&removed, name), sdk(before, name), "profile {}", name);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn files_people_write_merge_or_are_refused(before in file()) {
        check_merge(&before)?;
    }

    #[test]
    fn any_bytes_merge_or_are_refused_without_panicking(before in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(written) = replace_section(&before, "default", Some(BODY)) {
            prop_assert_eq!(section_values(&written, "default"), Some(our_values()));
            let again = replace_section(&written, "default", Some(BODY));
            prop_assert_eq!(again.as_deref().ok(), Some(&written[..]));
        }
        let _ = section_values(&before, "default");
    }
}

#[test]
fn a_header_the_rust_sdk_joins_across_carriage_returns_is_refused() {
    // botocore: lines `[`, `default]`, `[default]`. The Rust SDK: one line,
    // `[\rdefault]\r[default]`; ending it before our section would make that
    // SDK read `[\rdefault]` as a second [default].
    let err = refusal(b"[\rdefault]\r[default]\n");
    assert!(err.contains("line 2: a carriage return"), "{err}");
    let err = refusal(b"[\rdefault]");
    assert!(err.contains("split by a carriage return"), "{err}");
}
