//! The chat templates' `strftime_now(format)`: transformers' `datetime.now().strftime(format)`,
//! the current local time written with Python's (on Linux, glibc's) strftime directives.
//!
//! chrono reads the clock and the local time zone (`TZ`, else `/etc/localtime`) and writes the
//! directives it shares with glibc; the few where Python differs from chrono are written here.
use std::fmt::{Display, Write as _};

use chrono::{DateTime, Local, TimeZone, Timelike};

/// transformers' `strftime_now(format)`: the current local time, formatted as Python does.
/// chrono's `Local::now` panics on unreadable time-zone data; that becomes a template error here
/// (so a tokenizer error in Python), never a panic.
pub(super) fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let now = std::panic::catch_unwind(Local::now).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "strftime_now: the local time zone could not be read (check TZ and /etc/localtime)",
        )
    })?;
    Ok(py_strftime(&format, &now))
}

/// The conversions chrono writes as glibc does in the C locale (Python's default LC_TIME): names,
/// numbers with glibc's padding, and the composites `%c %D %F %r %R %T %x %X`.
const AS_GLIBC: &str = "aAbBcCdDeFgGhHIjklmMnpPrRsStTuUVwWxXyY%";

/// Python's `naive_datetime.strftime(format)` (CPython on glibc) for the wall-clock time of `t`:
/// - conversions in [`AS_GLIBC`] are chrono's, with glibc's flags: `-` (no padding), `_` (spaces),
///   `0` (zeros), all ignored on non-numbers as glibc does, and `^` (upper case; not `%P`);
/// - `%f` is Python's microseconds (chrono writes nanoseconds);
/// - `%z` and `%Z` are empty: `datetime.now()` is naive (chrono would write the offset);
/// - anything else is written as given, as glibc writes unknown conversions (chrono refuses
///   them). That includes glibc's field widths (`%10Y`), `#` flag and `E`/`O` modifiers, which
///   are not implemented, and `%:z` (Python 3.12 writes it empty, 3.11 as given).
fn py_strftime<Tz: TimeZone>(format: &str, t: &DateTime<Tz>) -> String
where
    Tz::Offset: Display,
{
    let mut out = String::with_capacity(format.len() + 16);
    let mut rest = format;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let directive = &rest[at + 1..];
        let mut chars = directive.chars();
        let (flag, conv) = match chars.next() {
            Some(f @ ('-' | '_' | '0' | '^')) => (Some(f), chars.next()),
            c => (None, c),
        };
        let len = 1 + flag.map_or(0, char::len_utf8) + conv.map_or(0, char::len_utf8);
        let spec = &rest[at..at + len];
        rest = &rest[at + len..];
        match (flag, conv) {
            (_, Some(c)) if AS_GLIBC.contains(c) => {
                let pad = flag.filter(|f| *f != '^');
                let text = chrono_directive(t, pad, c);
                if flag == Some('^') && c != 'P' {
                    out.push_str(&text.to_uppercase());
                } else {
                    out.push_str(&text);
                }
            }
            (None, Some('f')) => {
                let _ = write!(out, "{:06}", t.nanosecond() % 1_000_000_000 / 1000);
            }
            (_, Some('z' | 'Z')) => {}
            _ => out.push_str(spec),
        }
    }
    out.push_str(rest);
    out
}

/// One conversion of [`AS_GLIBC`] through chrono, with the padding flag where chrono takes one
/// (numbers); glibc ignores it elsewhere, so on chrono's refusal it is written without.
fn chrono_directive<Tz: TimeZone>(t: &DateTime<Tz>, pad: Option<char>, conv: char) -> String
where
    Tz::Offset: Display,
{
    let mut text = String::new();
    if let Some(pad) = pad {
        if write!(text, "{}", t.format(&format!("%{pad}{conv}"))).is_ok() {
            return text;
        }
        text.clear();
    }
    if write!(text, "{}", t.format(&format!("%{conv}"))).is_err() {
        // Unreachable for the conversions of AS_GLIBC; written as given, as glibc would.
        text = format!("%{conv}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Utc};
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// The local time of the tests that run a process: UTC+14 (POSIX `TZ` spells the offset
    /// west of UTC), as far from UTC as any real zone, so a UTC rendering cannot match it.
    const TZ_PLUS_14: &str = "XYZ-14";

    fn at(secs: i64, micros: u32, east: i32) -> DateTime<FixedOffset> {
        let utc = DateTime::from_timestamp(secs, micros * 1000)
            .unwrap_or_else(|| panic!("timestamp {secs}"));
        utc.with_timezone(&FixedOffset::east_opt(east).unwrap_or_else(|| panic!("offset {east}")))
    }

    #[test]
    fn formats_like_python() {
        // datetime.fromtimestamp(1722085509, UTC).strftime(...): 2024-07-27 13:05:09, a Saturday.
        let t = at(1_722_085_509, 0, 0);
        assert_eq!(
            py_strftime("%d %b %Y|%B %A %a|%H:%M:%S %I%p|%j %y %m %% %F %T %Q", &t),
            "27 Jul 2024|July Saturday Sat|13:05:09 01PM|209 24 07 % 2024-07-27 13:05:09 %Q"
        );
        assert_eq!(py_strftime("%Y-%m-%d %a", &at(0, 0, 0)), "1970-01-01 Thu");
        assert_eq!(
            py_strftime("%F %j", &at(951_782_400, 0, 0)),
            "2000-02-29 060"
        );
        // Where chrono differs from Python: %f is microseconds, %z/%Z are empty (naive time),
        // flags on names are ignored, unknown conversions and a lone % are kept.
        let t = at(1_722_085_509, 12_345, 3600);
        assert_eq!(
            py_strftime("%f|%z|%Z|%-a %_B|%-d %_m %0e|%^a %^P|%v %+ %:z|%", &t),
            "012345|||Sat July|27  7 27|SAT pm|%v %+ %:z|%"
        );
    }

    /// Runs `script` with the test Python (`LORATCH_TEST_PYTHON`, else `python3`) under
    /// `TZ=tz`, `input` on stdin; returns its stdout parsed as JSON.
    fn run_py(script: &str, tz: &str, input: &serde_json::Value) -> serde_json::Value {
        let py = std::env::var("LORATCH_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(&py)
            .args(["-c", script])
            .env("TZ", tz)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("writing to {py}: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{py}: {e}"));
        assert!(out.status.success(), "{py} failed");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{py}'s output: {e}"))
    }

    /// Every directive chrono writes, with each glibc flag, and the ones written here, against
    /// Python's `datetime.strftime` at times that reach the edges (midnight and noon for the
    /// 12-hour clock, one-digit fields, ISO week 53 of the year before, a leap day).
    #[test]
    fn every_directive_matches_python_datetime_strftime() {
        let mut formats: Vec<String> = Vec::new();
        for c in AS_GLIBC.chars() {
            for flag in ["", "-", "_", "0", "^"] {
                formats.push(format!("%{flag}{c}"));
            }
        }
        formats.extend(
            [
                "%f",
                "%z",
                "%Z",
                "%-z",
                "%Q",
                "%v",
                "%+",
                "%L",
                "%",
                "é %d%%%m ✓",
            ]
            .map(String::from),
        );
        // (UTC seconds, microseconds); printed in UTC+14.
        let times: [(i64, u32); 5] = [
            (1_722_085_509, 0),
            (1_609_581_607, 5), // 2021-01-03 00:00:07 local, a Sunday in ISO week 2020-W53
            (951_825_600, 999_999), // 2000-02-29 12:00:00 local
            (1_041_415_199, 123), // 2003-01-02 23:59:59 local
            (1_000_000_000, 654_321), // 2001-09-10 15:46:40 local
        ];
        let script = "import json, sys\n\
            from datetime import datetime\n\
            q = json.load(sys.stdin)\n\
            ts = [datetime.fromtimestamp(s).replace(microsecond=u) for s, u in q['times']]\n\
            print(json.dumps([[t.strftime(f) for f in q['formats']] for t in ts]))";
        let input = serde_json::json!({"formats": formats, "times": times});
        let expected = run_py(script, TZ_PLUS_14, &input);
        for (i, &(secs, micros)) in times.iter().enumerate() {
            let t = at(secs, micros, 14 * 3600);
            for (j, f) in formats.iter().enumerate() {
                assert_eq!(
                    Some(py_strftime(f, &t).as_str()),
                    expected[i][j].as_str(),
                    "{f:?} at {t}"
                );
            }
        }
    }

    /// Set in the child process of [`strftime_now_is_local_time`].
    const CHILD: &str = "LORATCH_STRFTIME_NOW_CHILD";

    /// `strftime_now` through a template, in a child process with `TZ` at UTC+14 (a test must
    /// not change the environment of its own process, which other tests' threads read).
    #[test]
    fn strftime_now_is_local_time() {
        let template = "{{ strftime_now('%Y-%m-%d %H:%M') }}";
        if std::env::var_os(CHILD).is_some() {
            let t = super::super::ChatTemplate::new(template)
                .unwrap_or_else(|e| panic!("{template}: {e}"));
            let now = t
                .render(&[super::super::Message::user("x")], false, &[])
                .unwrap_or_else(|e| panic!("{template}: {e}"));
            println!("<now>{now}</now>");
            return;
        }
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
        let name = "tokenizer::chat::strftime::tests::strftime_now_is_local_time";
        let in_zone = |t: DateTime<Utc>, east: i32| {
            py_strftime(
                "%Y-%m-%d %H:%M",
                &t.with_timezone(&FixedOffset::east_opt(east).unwrap_or_else(|| panic!("{east}"))),
            )
        };
        let before = Utc::now();
        let out = Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("TZ", TZ_PLUS_14)
            .output()
            .unwrap_or_else(|e| panic!("running the test binary: {e}"));
        let after = Utc::now();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let now = stdout
            .split_once("<now>")
            .and_then(|(_, s)| s.split_once("</now>"))
            .map(|(now, _)| now)
            .unwrap_or_else(|| panic!("no <now> in the child's output: {stdout}"));
        let local = [in_zone(before, 14 * 3600), in_zone(after, 14 * 3600)];
        assert!(
            local.iter().any(|l| l == now),
            "{now} is not one of {local:?} (UTC+14)"
        );
        assert!(
            now != in_zone(before, 0) && now != in_zone(after, 0),
            "{now} is UTC"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any format at any time chrono represents gives a string, never a panic.
        #[test]
        fn never_panics(format in "(%[-_0^#:.]?.|\\PC)*", secs: i64, east in -86_399i32..86_400) {
            if let (Some(t), Some(tz)) = (DateTime::from_timestamp(secs, 0), FixedOffset::east_opt(east)) {
                let _ = py_strftime(&format, &t.with_timezone(&tz));
            }
        }
    }
}
