//! The fault directives: their syntax, and when each one fires.
//!
//! ```text
//! delay C_Sign 20ms                       # latency before forwarding (us, ms, s)
//! fail C_Sign CKR_DEVICE_ERROR            # answer this code instead of forwarding
//! fail C_Sign 0x30 after 3                # let 3 calls through, fail every later one
//! fail C_Login CKR_PIN_EXPIRED every 2    # fail the 2nd, 4th, ... call
//! hang C_Sign                             # block until the directive is gone
//! ```
//!
//! Directives are separated by newlines or `;`; `#` starts a comment. This module is pure
//! parsing and counting so that it can be tested without a PKCS#11 module underneath.

use std::time::Duration;

use cryptoki_sys::CK_RV;

use crate::rv;

/// What a directive does to a matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Sleep this long, then go on.
    Delay(Duration),
    /// Return this code without forwarding the call.
    Fail(CK_RV),
    /// Block until no `hang` directive names the function any more.
    Hang,
}

/// Which of the matching calls a directive acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Every call.
    Always,
    /// Every call after the first `n`.
    After(u64),
    /// Calls `n`, `2n`, `3n`, ...
    Every(u64),
}

/// One parsed directive and how many calls it has seen since it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// The PKCS#11 function it applies to, as spelled in the standard (`C_Sign`).
    pub function: &'static str,
    /// What it does.
    pub action: Action,
    /// When it does it.
    pub trigger: Trigger,
    seen: u64,
}

impl Directive {
    /// Whether the directive acts on this call. A `counted` call advances the count that
    /// `after`/`every` look at. An uncounted one (a PKCS#11 size query: the first half of one
    /// logical operation) is judged as if it were the next counted call; it advances the count
    /// only when the directive fires on it, since the caller then never makes the second half.
    pub fn fires(&mut self, counted: bool) -> bool {
        let n = self.seen.saturating_add(1);
        let fires = match self.trigger {
            Trigger::Always => true,
            Trigger::After(first) => n > first,
            Trigger::Every(period) => n.is_multiple_of(period),
        };
        if counted || fires {
            self.seen = n;
        }
        fires
    }
}

/// A directive line that was ignored, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    /// The first word is not `delay`, `fail` or `hang`.
    #[error("unknown directive `{verb}` in `{text}`")]
    UnknownVerb {
        /// The word that was not understood.
        verb: String,
        /// The whole directive.
        text: String,
    },
    /// The function is not a PKCS#11 2.40 function.
    #[error("unknown PKCS#11 function `{function}` in `{text}`")]
    UnknownFunction {
        /// The name that was not understood.
        function: String,
        /// The whole directive.
        text: String,
    },
    /// A word is missing, malformed or extra.
    #[error("bad {what} in `{text}`: expected {expected}")]
    Malformed {
        /// The part that is wrong.
        what: &'static str,
        /// What was expected instead.
        expected: &'static str,
        /// The whole directive.
        text: String,
    },
}

/// Parses a whole control text. Bad directives are returned beside the good ones so that the
/// caller can report them and keep the rest working.
pub fn parse(
    text: &str,
    lookup: impl Fn(&str) -> Option<&'static str>,
) -> (Vec<Directive>, Vec<DirectiveError>) {
    let mut directives = Vec::new();
    let mut errors = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for item in line.split(';') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            match parse_one(item, &lookup) {
                Ok(directive) => directives.push(directive),
                Err(error) => errors.push(error),
            }
        }
    }
    (directives, errors)
}

fn parse_one(
    text: &str,
    lookup: &impl Fn(&str) -> Option<&'static str>,
) -> Result<Directive, DirectiveError> {
    let malformed = |what, expected| DirectiveError::Malformed {
        what,
        expected,
        text: text.to_owned(),
    };
    let mut words = text.split_whitespace();
    let verb = words.next().unwrap_or_default();
    if !matches!(verb, "delay" | "fail" | "hang") {
        return Err(DirectiveError::UnknownVerb {
            verb: verb.to_owned(),
            text: text.to_owned(),
        });
    }
    let name = words
        .next()
        .ok_or_else(|| malformed("function", "a PKCS#11 function name such as C_Sign"))?;
    let function = lookup(name).ok_or_else(|| DirectiveError::UnknownFunction {
        function: name.to_owned(),
        text: text.to_owned(),
    })?;
    let action = match verb {
        "delay" => {
            let amount = words
                .next()
                .and_then(parse_duration)
                .ok_or_else(|| malformed("duration", "a number with us, ms or s (20ms)"))?;
            Action::Delay(amount)
        }
        "fail" => {
            let code = words
                .next()
                .and_then(rv::parse)
                .ok_or_else(|| malformed("return code", "a CKR_ name or a 0x hex code"))?;
            Action::Fail(code)
        }
        _ => Action::Hang,
    };
    let trigger = match (words.next(), words.next()) {
        (None, _) => Trigger::Always,
        (Some("after"), Some(n)) => Trigger::After(
            n.parse()
                .map_err(|_| malformed("count after `after`", "a whole number"))?,
        ),
        (Some("every"), Some(n)) => match n.parse() {
            Ok(period) if period > 0 => Trigger::Every(period),
            _ => return Err(malformed("count after `every`", "a whole number above 0")),
        },
        _ => return Err(malformed("trigger", "`after N` or `every N`")),
    };
    if words.next().is_some() {
        return Err(malformed("ending", "nothing after the trigger"));
    }
    Ok(Directive {
        function,
        action,
        trigger,
        seen: 0,
    })
}

/// `20ms`, `500us`, `2s`; a bare number is milliseconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "us" | "µs" => Some(Duration::from_micros(number)),
        "ms" | "" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        _ => None,
    }
}

/// The shortest exact spelling of a duration, in the units directives accept.
pub fn format_duration(amount: Duration) -> String {
    let micros = amount.as_micros();
    if micros.is_multiple_of(1_000_000) && micros > 0 {
        format!("{}s", micros / 1_000_000)
    } else if micros.is_multiple_of(1_000) {
        format!("{}ms", micros / 1_000)
    } else {
        format!("{micros}us")
    }
}

#[cfg(test)]
mod tests {
    use cryptoki_sys::{CKR_DEVICE_ERROR, CKR_PIN_EXPIRED};

    use super::*;

    fn lookup(name: &str) -> Option<&'static str> {
        ["C_Sign", "C_Login"]
            .into_iter()
            .find(|known| *known == name)
    }

    #[test]
    fn parses_every_form() {
        let text = "delay C_Sign 20ms\nfail C_Sign CKR_DEVICE_ERROR after 3 # comment\n\
                    fail C_Login 0xa3 every 2; hang C_Sign ;delay C_Login 250us; delay C_Sign 1s";
        let (directives, errors) = parse(text, lookup);
        assert_eq!(errors, vec![]);
        let got: Vec<_> = directives
            .iter()
            .map(|d| (d.function, d.action, d.trigger))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "C_Sign",
                    Action::Delay(Duration::from_millis(20)),
                    Trigger::Always
                ),
                ("C_Sign", Action::Fail(CKR_DEVICE_ERROR), Trigger::After(3)),
                ("C_Login", Action::Fail(CKR_PIN_EXPIRED), Trigger::Every(2)),
                ("C_Sign", Action::Hang, Trigger::Always),
                (
                    "C_Login",
                    Action::Delay(Duration::from_micros(250)),
                    Trigger::Always
                ),
                (
                    "C_Sign",
                    Action::Delay(Duration::from_secs(1)),
                    Trigger::Always
                ),
            ]
        );
    }

    #[test]
    fn bad_lines_are_reported_and_the_rest_kept() {
        let text = "explode C_Sign\nfail C_Nope CKR_DEVICE_ERROR\nfail C_Sign CKR_NOPE\n\
                    delay C_Sign 20parsecs\nfail C_Sign 0x30 every 0\nhang C_Sign now\n\
                    hang\nfail C_Sign 0x30 after\nhang C_Login";
        let (directives, errors) = parse(text, lookup);
        assert_eq!(directives.len(), 1);
        assert_eq!(directives[0].function, "C_Login");
        assert_eq!(errors.len(), 8, "{errors:?}");
        assert!(
            matches!(&errors[0], DirectiveError::UnknownVerb { verb, .. } if verb == "explode")
        );
        assert!(
            matches!(&errors[1], DirectiveError::UnknownFunction { function, .. } if function == "C_Nope")
        );
        assert!(errors[2].to_string().contains("return code"));
    }

    #[test]
    fn after_and_every_count_only_counted_calls() {
        let (mut directives, _) =
            parse("fail C_Sign 0x30 after 2; fail C_Sign 0x30 every 2", lookup);
        let mut after = directives.remove(0);
        let mut every = directives.remove(0);
        // A size query looks at the call it precedes without consuming it.
        let after_seen: Vec<bool> = [false, true, false, true, false, true]
            .into_iter()
            .map(|counted| after.fires(counted))
            .collect();
        assert_eq!(after_seen, [false, false, false, false, true, true]);
        // Two-call operations: the 2nd fails on its size query and never makes its real call.
        let every_seen: Vec<bool> = [false, true, false, false, true, false, true]
            .into_iter()
            .map(|counted| every.fires(counted))
            .collect();
        assert_eq!(every_seen, [false, false, true, false, false, true, false]);
    }

    #[test]
    fn durations_format_back_to_what_was_written() {
        assert_eq!(format_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(format_duration(Duration::from_micros(250)), "250us");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
    }
}
