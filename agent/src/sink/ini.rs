//! Replacing one profile's section of an AWS shared-credentials file.
//!
//! The file belongs to its owner: other profiles, comments, blank lines, line
//! endings, a byte-order mark and bytes that are not UTF-8 are kept byte for
//! byte. Only the sections that some consumer reads as our `[profile]` are
//! replaced (every one of them, if a person duplicated it), appended when
//! absent, or removed. When the consumers would disagree about what is our
//! profile, the merge is refused with an error naming the line and the fix,
//! rather than leaving a copy of our profile that an SDK reads and we do not.
//!
//! # How the consumers read the file
//!
//! The structure is worked out the way the two reference readers do it:
//!
//! - **botocore** (the AWS CLI, boto3) uses Python's `configparser`. It
//!   decodes the file as UTF-8, splits lines on `\n`, `\r\n` *and* a lone `\r`,
//!   and strips each line. A line starting with `#` or `;` after its
//!   indentation is a comment. A line indented deeper than the option above it
//!   continues that option's value; any other line matching `[name]` is a
//!   section header whose name is everything between the first `[` and the last
//!   `]`, untrimmed. A section repeated in one file is an error
//!   (`DuplicateSectionError`), and `[DEFAULT]` holds defaults for every
//!   section.
//! - **The AWS SDK for Rust** (`aws-runtime`'s profile parser) reads the file
//!   as UTF-8 (otherwise as empty) and splits lines on `\n` only. A header
//!   must start in column 0; any line starting with a space or tab continues
//!   the previous value (or is an error). It cuts a header at `#`/`;`, trims
//!   spaces, tabs and then all whitespace from the name, merges repeated
//!   sections, and ignores `[profile x]` in a credentials file.
//!
//! # Decisions
//!
//! | Found in the file | What we do | Why |
//! |---|---|---|
//! | Byte-order mark | kept; line 1 is read without it | BOM-aware readers see the header after it; neither reference reader parses such a file at all, before or after our write |
//! | CR-only line endings | kept; lines split like botocore; our lines end in CR too | botocore reads it; the Rust SDK reads the whole file as one line, before and after our write |
//! | CRLF line endings | kept; our lines end in CRLF | every reader strips the CR |
//! | a lone CR in a file with LF line breaks | kept, unless at or just before our section: refused | botocore splits the line there and the Rust SDK does not, so rewriting our section would change what that SDK reads around it |
//! | `[ default ]`, `[default] ; note`, `[\tdefault]` | our section: replaced | the Rust SDK reads each as `default` (and merges it with ours) |
//! | `[profile default]` | kept, not ours | a credentials-file header for neither reader: botocore calls it `profile default`, the Rust SDK ignores it |
//! | indented `[default]` that botocore reads as a header (first in the file, right after a header, or no deeper than the option above) | our section: replaced by an unindented one | every reader that can parse the file sees a header there (the Rust SDK cannot parse it) |
//! | indented `[default]` deeper than the option above | refused | botocore and the Rust SDK read it as part of the value above, other readers as a header: a copy of our profile we cannot remove without changing another profile |
//! | indented header ending our section, or a `[header]`-like line continuing a value inside it | refused | after our rewrite botocore would read that header as part of our last value, or we would delete what other readers call a profile |
//! | a `[default]` header with a lone CR inside (`[\rdefault]`) | refused | the Rust SDK reads one line, `[default]`; botocore reads two lines, neither a header |
//! | `[DEFAULT]` | refused | botocore applies its keys to every section, ours included |
//! | `[default]` twice | all copies removed, ours written where the first was | botocore refuses a file with a repeated section, and the Rust SDK merges the copies |
//! | non-UTF-8 bytes | kept outside our section, dropped with it | the owner's bytes; neither reference reader parses such a file |
//!
//! Our own output never contains what we refuse, so a write never blocks the
//! writes after it.

use anyhow::{bail, ensure};

/// The UTF-8 byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Whitespace as Python's `str.strip()` and regex `\s` see it (Unicode
/// whitespace plus the information separators U+001C..U+001F).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Whitespace trimmed from a section name when deciding whether it is ours:
/// generous, so that a copy of our profile is never missed.
fn is_name_blank(c: char) -> bool {
    is_py_space(c) || c == '\u{feff}'
}

/// How botocore's `configparser` classifies one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Empty after stripping.
    Blank,
    /// `#` or `;` after the indentation.
    Comment,
    /// A `[name]` section header.
    Header,
    /// Indented deeper than the option above: part of its value.
    Continuation,
    /// `key = value` (or `key: value`).
    Option,
    /// Anything else: a parse error for botocore.
    Other,
}

/// One line as botocore splits the file (on `\n`, `\r\n` or a lone `\r`).
#[derive(Debug)]
struct Line<'a> {
    /// The line with its terminator, exactly as in the file.
    raw: &'a [u8],
    /// The line without its terminator, decoded (invalid bytes become U+FFFD,
    /// which is neither whitespace nor punctuation, as bytes-based readers see it).
    text: String,
    kind: Kind,
    /// Leading whitespace, in characters.
    indent: usize,
    /// Whether some consumer reads this `[...]` line as our profile's header.
    ours: bool,
}

impl Line<'_> {
    /// The line with its indentation and trailing whitespace removed.
    fn stripped(&self) -> &str {
        self.text.trim_matches(is_py_space)
    }

    /// The section name botocore reads: between the first `[` and the last `]`.
    fn python_name(&self) -> Option<&str> {
        let s = self.stripped();
        let end = s.rfind(']').filter(|&end| end >= 2)?;
        s.strip_prefix('[').map(|_| &s[1..end])
    }
}

/// Splits `text` into lines with their terminators: `\r\n`, `\n` or a lone `\r`.
fn split_lines(text: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\n' => {
                lines.push(&text[start..=i]);
                start = i + 1;
            }
            b'\r' => {
                let end = if text.get(i + 1) == Some(&b'\n') {
                    i + 1
                } else {
                    i
                };
                lines.push(&text[start..=end]);
                i = end;
                start = end + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// The content of a raw line without its terminator.
fn content(raw: &[u8]) -> &[u8] {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

/// Whether the AWS SDK for Rust reads `line` (a whole `\n`-terminated line,
/// without the terminator) as the header of `profile` in a credentials file.
fn rust_sdk_header_is(line: &str, profile: &str) -> bool {
    const SPACE_TAB: &[char] = &[' ', '\t'];
    if !line.starts_with('[') {
        return false;
    }
    let cut = line.find(['#', ';']).map_or(line, |end| &line[..end]);
    let Some(name) = cut
        .trim_matches(SPACE_TAB)
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
    else {
        return false;
    };
    let name = name.trim_matches(SPACE_TAB);
    // `[prefix name]` is ignored in a credentials file.
    !name.contains(SPACE_TAB) && name.trim() == profile
}

/// Whether any consumer reads the `[...]` line `stripped` as `profile`'s header.
fn names_profile(stripped: &str, profile: &str) -> bool {
    let Some(inner) = stripped.strip_prefix('[') else {
        return false;
    };
    let by_bracket = |end: Option<usize>| {
        end.is_some_and(|end| inner[..end].trim_matches(is_name_blank) == profile)
    };
    by_bracket(inner.find(']'))
        || by_bracket(inner.rfind(']'))
        || rust_sdk_header_is(stripped, profile)
}

/// The lines of `text` (after any byte-order mark), classified as botocore
/// does, with the headers of `profile` marked.
fn analyse<'a>(text: &'a [u8], profile: &str) -> Vec<Line<'a>> {
    let mut in_section = false;
    let mut option_open = false;
    let mut indent_level = 0;
    split_lines(text)
        .into_iter()
        .map(|raw| {
            let text = String::from_utf8_lossy(content(raw)).into_owned();
            let stripped = text.trim_matches(is_py_space);
            let indent = text.chars().take_while(|&c| is_py_space(c)).count();
            let kind = if stripped.is_empty() {
                Kind::Blank
            } else if stripped.starts_with(['#', ';']) {
                Kind::Comment
            } else if in_section && option_open && indent > indent_level {
                Kind::Continuation
            } else {
                indent_level = indent;
                let header = stripped.starts_with('[') && stripped.rfind(']') >= Some(2);
                if header {
                    in_section = true;
                    option_open = false;
                    Kind::Header
                } else if let (true, Some(at)) = (in_section, stripped.find(['=', ':'])) {
                    option_open = at > 0;
                    Kind::Option
                } else {
                    Kind::Other
                }
            };
            let ours = stripped.starts_with('[') && names_profile(stripped, profile);
            Line {
                raw,
                text,
                kind,
                indent,
                ours,
            }
        })
        .collect()
}

/// The index just past the section whose header is `lines[header]`.
fn section_end(lines: &[Line<'_>], header: usize) -> usize {
    lines[header + 1..]
        .iter()
        .position(|line| line.kind == Kind::Header)
        .map_or(lines.len(), |n| header + 1 + n)
}

/// Refuses a file whose consumers would disagree about our profile, naming
/// the first such line (1-based, counting lines as botocore does).
/// `cr_only`: the file's line breaks are all a lone `\r`.
fn check(text: &[u8], lines: &[Line<'_>], profile: &str, cr_only: bool) -> anyhow::Result<()> {
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        if line.ours && line.kind == Kind::Continuation {
            bail!(
                "line {n}: an indented [{profile}] header under an option: botocore and the AWS \
                 SDK for Rust read it as part of the value above, other readers as a second \
                 [{profile}] profile; remove the leading whitespace to make it the profile \
                 imds-agent manages, or delete the line"
            );
        }
        if line.kind == Kind::Header
            && line.python_name() == Some("DEFAULT")
            && profile != "DEFAULT"
        {
            bail!(
                "line {n}: a [DEFAULT] section: botocore applies its keys to every profile, \
                 including [{profile}] that imds-agent manages; move its keys into the profiles \
                 that need them and delete the section"
            );
        }
        if !(line.ours && line.kind == Kind::Header) {
            continue;
        }
        let end = section_end(lines, i);
        if let Some(k) = (i + 1..end)
            .find(|&k| lines[k].kind == Kind::Continuation && lines[k].python_name().is_some())
        {
            bail!(
                "line {}: an indented line that looks like a section header inside [{profile}] \
                 (line {n}): botocore reads it as part of a value there, other readers as a \
                 new section that replacing [{profile}] would delete; remove its leading \
                 whitespace",
                k + 1
            );
        }
        if lines
            .get(end)
            .is_some_and(|next| next.indent > 0 && !next.ours)
        {
            bail!(
                "line {}: an indented section header ends [{profile}] (line {n}): once \
                 imds-agent rewrites [{profile}], botocore would read it as part of the last \
                 value; remove its leading whitespace",
                end + 1
            );
        }
        // In a file with LF line breaks, a lone `\r` next to our section joins
        // lines for the Rust SDK that botocore reads apart: rewriting the
        // section would change what that SDK reads around it.
        if !cr_only
            && let Some(k) = (i.saturating_sub(1)..end).find(|&k| lines[k].raw.ends_with(b"\r"))
        {
            bail!(
                "line {}: a carriage return without a line feed at or just before [{profile}] \
                 (line {n}), in a file with LF line breaks: botocore reads it as a line break, \
                 the AWS SDK for Rust does not, so they disagree on what is around \
                 [{profile}]; convert the file to LF line endings",
                k + 1
            );
        }
    }
    // The Rust SDK splits on `\n` only: a header it reads as ours may span a lone `\r`.
    if let Some((n, _)) = rust_sdk_headers(text, profile).find(|(_, line)| line.contains('\r')) {
        bail!(
            "line {n} (counting LF line breaks): a [{profile}] header split by a carriage \
             return: the AWS SDK for Rust reads it as [{profile}], botocore as other lines; \
             delete the carriage returns inside the header"
        );
    }
    Ok(())
}

/// The lines (1-based number, text) the AWS SDK for Rust reads as `profile`'s
/// header: it splits on `\n` only and drops a `\r` before it.
fn rust_sdk_headers<'a>(
    text: &'a [u8],
    profile: &'a str,
) -> impl Iterator<Item = (usize, String)> + 'a {
    text.split(|&b| b == b'\n')
        .map(|raw| String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned())
        .enumerate()
        .filter(|(_, line)| rust_sdk_header_is(line, profile))
        .map(|(i, line)| (i + 1, line))
}

/// `existing` with every `[profile]` section replaced by one whose lines are
/// `body` (the lines after the header, each ending in `\n`), placed where the
/// first was or appended when there is none; or with every such section
/// removed when `body` is `None`.
///
/// Everything else is kept byte for byte: other profiles, comments, blank
/// lines, line endings, a byte-order mark and bytes that are not UTF-8. Our
/// lines end in CR in a file whose line breaks are all CR, else in CRLF when
/// the file's first line ends in CR (CRLF or CR alone), else in LF. Appending
/// after a last line that ends in a lone CR adds CRLF, which botocore reads as
/// a blank line and the Rust SDK as the end of that same line. The module
/// docs list which lines are read as `[profile]` and why.
///
/// # Errors
///
/// When the consumers of the file would disagree about which lines are
/// `[profile]` or what surrounds it (an indented header, a `[DEFAULT]`
/// section, a carriage return without a line feed next to it), naming the
/// line and the fix; or when `profile` cannot be written as a header every
/// reader parses. Nothing this function writes is refused on a later call.
pub fn replace_section(
    existing: &[u8],
    profile: &str,
    body: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    ensure!(
        !profile.is_empty()
            && profile.trim() == profile
            && !profile.contains(['[', ']', '#', ';', '\r', '\n']),
        "invalid profile name {profile:?}: use letters, digits, '-' or '_' \
         ('#' and ';' start a comment for the AWS SDK for Rust)"
    );
    let (bom, text) = match existing.strip_prefix(BOM) {
        Some(rest) => (BOM, rest),
        None => (&b""[..], existing),
    };
    let cr_only = text.contains(&b'\r') && !text.contains(&b'\n');
    let lines = analyse(text, profile);
    check(text, &lines, profile, cr_only)?;

    let eol: &[u8] = match lines.first().map(|line| line.raw) {
        _ if cr_only => b"\r",
        Some(raw) if raw.ends_with(b"\r") || raw.ends_with(b"\r\n") => b"\r\n",
        _ => b"\n",
    };
    let mut section = body.map(|body| {
        let mut section = Vec::with_capacity(body.len() + profile.len() + 16);
        section.extend_from_slice(format!("[{profile}]").as_bytes());
        section.extend_from_slice(eol);
        for line in body.lines() {
            section.extend_from_slice(line.as_bytes());
            section.extend_from_slice(eol);
        }
        section
    });

    let mut out = Vec::with_capacity(existing.len() + section.as_ref().map_or(0, Vec::len) + 4);
    out.extend_from_slice(bom);
    let mut in_ours = false;
    for line in &lines {
        if line.kind == Kind::Header {
            in_ours = line.ours;
            if in_ours {
                if let Some(section) = section.take() {
                    out.extend_from_slice(&section);
                }
                continue;
            }
        }
        if !in_ours {
            out.extend_from_slice(line.raw);
        }
    }
    if let (Some(section), Some(last)) = (&section, lines.last()) {
        if !cr_only && last.raw.ends_with(b"\r") {
            out.extend_from_slice(b"\r\n");
        } else {
            if !last.raw.ends_with(b"\n") && !last.raw.ends_with(b"\r") {
                out.extend_from_slice(eol);
            }
            let has_content = lines.iter().any(|line| line.kind != Kind::Blank);
            if has_content && last.kind != Kind::Blank {
                out.extend_from_slice(eol);
            }
        }
        out.extend_from_slice(section);
    } else if let Some(section) = section {
        out.extend_from_slice(&section);
    }
    Ok(out)
}

/// The `key = value` pairs of every `[profile]` section in `text`, in file
/// order (a profile duplicated by a person shows as repeated keys), read the
/// way [`replace_section`] finds the sections; `None` when there is no such
/// section. For tests and checks.
pub fn section_values(text: &[u8], profile: &str) -> Option<Vec<(String, String)>> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    let lines = analyse(text, profile);
    let mut found = None::<Vec<(String, String)>>;
    let mut in_ours = false;
    for line in &lines {
        if line.kind == Kind::Header {
            in_ours = line.ours;
            if in_ours {
                found.get_or_insert_with(Vec::new);
            }
        } else if in_ours
            && line.kind == Kind::Option
            && let Some((k, v)) = line.stripped().split_once('=')
        {
            found
                .get_or_insert_with(Vec::new)
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    found
}

#[cfg(test)]
#[path = "ini_tests.rs"]
mod tests;
