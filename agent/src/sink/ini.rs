//! Replacing one profile's section of an AWS shared-credentials file.
//!
//! The file belongs to its owner: other profiles, comments, blank lines and
//! line endings are kept byte for byte. Only the lines from our `[profile]`
//! header up to the next section header are replaced (every such section, if
//! a person duplicated it), appended when absent, or removed.

/// The section name of a header line (`[ name ]` -> `name`), if it is one.
fn header_name(line: &str) -> Option<&str> {
    let trimmed = line.trim();
    let inner = trimmed.strip_prefix('[')?;
    let end = inner.find(']')?;
    Some(inner[..end].trim())
}

/// `existing` with the `[profile]` section replaced by `body` (the lines
/// after the header, each ending in `\n`), or removed when `body` is `None`.
pub fn replace_section(existing: &str, profile: &str, body: Option<&str>) -> String {
    let mut out = String::with_capacity(existing.len() + body.map_or(0, str::len) + 32);
    let mut in_ours = false;
    let mut written = false;
    for line in existing.split_inclusive('\n') {
        if let Some(name) = header_name(line) {
            in_ours = name == profile;
            if in_ours {
                if let (Some(body), false) = (body, written) {
                    out.push_str(&format!("[{profile}]\n"));
                    out.push_str(body);
                    written = true;
                }
                continue;
            }
        }
        if !in_ours {
            out.push_str(line);
        }
    }
    if let (Some(body), false) = (body, written) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if !out.trim().is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(&format!("[{profile}]\n"));
        out.push_str(body);
    }
    out
}

/// The key/value pairs of the `[profile]` section (for tests and checks).
pub fn section_values(text: &str, profile: &str) -> Option<Vec<(String, String)>> {
    let mut found = None::<Vec<(String, String)>>;
    let mut in_ours = false;
    for line in text.lines() {
        if let Some(name) = header_name(line) {
            in_ours = name == profile;
            if in_ours && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if in_ours
            && let Some((k, v)) = line.split_once('=')
            && !line.trim_start().starts_with(['#', ';'])
        {
            found
                .get_or_insert_with(Vec::new)
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BODY: &str = "aws_access_key_id = A\naws_secret_access_key = S\n";

    #[test]
    fn replaces_only_our_section_and_keeps_everything_else() {
        let before = "# my notes\r\n[other]\r\naws_access_key_id = X\r\n\r\n[ default ]\nold = 1\n; c\n[profile x]\nk = v";
        let after = replace_section(before, "default", Some(BODY));
        assert_eq!(
            after,
            format!(
                "# my notes\r\n[other]\r\naws_access_key_id = X\r\n\r\n[default]\n{BODY}[profile x]\nk = v"
            )
        );
    }

    #[test]
    fn appends_when_absent_and_removes_all_duplicates() {
        assert_eq!(
            replace_section("", "default", Some(BODY)),
            format!("[default]\n{BODY}")
        );
        assert_eq!(
            replace_section("[a]\nk=v", "default", Some(BODY)),
            format!("[a]\nk=v\n\n[default]\n{BODY}")
        );
        let dup = "[default]\nx=1\n[a]\nk=v\n[default]\ny=2\n";
        assert_eq!(replace_section(dup, "default", None), "[a]\nk=v\n");
        assert_eq!(
            replace_section(dup, "default", Some(BODY)),
            format!("[default]\n{BODY}[a]\nk=v\n")
        );
    }

    fn other_line() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,8} ?= ?[A-Za-z0-9/+]{0,12}",
            "# [^\n\r]{0,20}",
            "; [^\n\r]{0,20}",
            "\\[[a-z]{1,6}\\]",
            "\\[profile [a-z]{1,6}\\]",
            "[^\n\r\\[]{0,20}",
            Just(String::new()),
        ]
    }

    proptest! {
        #[test]
        fn everything_outside_our_section_survives(
            lines in proptest::collection::vec(other_line(), 0..20),
            crlf in any::<bool>(),
            trailing in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut others = lines.join(eol);
            if trailing && !others.is_empty() { others.push_str(eol); }
            prop_assume!(section_values(&others, "ours").is_none());
            let written = replace_section(&others, "ours", Some(BODY));
            let values = section_values(&written, "ours").unwrap();
            prop_assert_eq!(values, vec![
                ("aws_access_key_id".to_owned(), "A".to_owned()),
                ("aws_secret_access_key".to_owned(), "S".to_owned()),
            ]);
            prop_assert!(written.starts_with(&others));
            let removed = replace_section(&written, "ours", None);
            prop_assert_eq!(removed.trim_end(), others.trim_end());
        }
    }
}
