//! The `Range` request header (RFC 9110 §14) for artifact downloads, so that an
//! agent on a flaky link resumes a broken download instead of starting over. One
//! range per request; anything else is ignored and the whole artifact is sent.

/// What to send for a request's `Range` header against a blob of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No usable range: 200 with the whole blob.
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416: the range starts at or past the end of the blob.
    Unsatisfiable,
}

/// Decides what `Range: <header>` means for a blob of `len` bytes. Supports
/// `bytes=a-b`, `bytes=a-` and `bytes=-n` (the last n bytes). Malformed headers
/// and several ranges at once are ignored, as RFC 9110 allows.
pub fn parse_range(header: Option<&str>, len: u64) -> ByteRange {
    let Some(header) = header else {
        return ByteRange::Full;
    };
    let Some((unit, spec)) = header.trim().split_once('=') else {
        return ByteRange::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (parse_position(first), parse_position(last)) {
        // bytes=-n: the last n bytes.
        (Some(None), Some(Some(suffix))) => {
            if suffix == 0 || len == 0 {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Partial {
                    start: len.saturating_sub(suffix),
                    end: len - 1,
                }
            }
        }
        // bytes=a- and bytes=a-b.
        (Some(Some(start)), Some(last)) => {
            if last.is_some_and(|last| last < start) {
                return ByteRange::Full;
            }
            if start >= len {
                return ByteRange::Unsatisfiable;
            }
            let end = last.map_or(len - 1, |last| last.min(len - 1));
            ByteRange::Partial { start, end }
        }
        _ => ByteRange::Full,
    }
}

/// `Some(None)` for an empty position, `Some(Some(n))` for digits, `None` otherwise.
fn parse_position(text: &str) -> Option<Option<u64>> {
    if text.is_empty() {
        return Some(None);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ByteRange::{Full, Partial, Unsatisfiable};

    #[test]
    fn range_table() {
        let len = 1000;
        let cases: &[(Option<&str>, ByteRange)] = &[
            (None, Full),
            (Some("bytes=0-499"), Partial { start: 0, end: 499 }),
            (
                Some("bytes=500-"),
                Partial {
                    start: 500,
                    end: 999,
                },
            ),
            (
                Some("bytes=999-"),
                Partial {
                    start: 999,
                    end: 999,
                },
            ),
            (Some("bytes=0-0"), Partial { start: 0, end: 0 }),
            (
                Some("bytes=900-5000"),
                Partial {
                    start: 900,
                    end: 999,
                },
            ),
            (
                Some("bytes=-100"),
                Partial {
                    start: 900,
                    end: 999,
                },
            ),
            (Some("bytes=-5000"), Partial { start: 0, end: 999 }),
            (Some(" Bytes = 10 - 19 "), Partial { start: 10, end: 19 }),
            (Some("bytes=1000-"), Unsatisfiable),
            (Some("bytes=1000-1001"), Unsatisfiable),
            (Some("bytes=-0"), Unsatisfiable),
            (Some("bytes=5-4"), Full),
            (Some("bytes=0-1,5-6"), Full),
            (Some("items=0-1"), Full),
            (Some("bytes=a-b"), Full),
            (Some("bytes=+1-2"), Full),
            (Some("bytes=-"), Full),
            (Some("bytes"), Full),
            (Some(""), Full),
            (Some("bytes=99999999999999999999999-"), Full),
        ];
        for (header, want) in cases {
            assert_eq!(parse_range(*header, len), *want, "Range: {header:?}");
        }
    }

    #[test]
    fn empty_blob_has_no_satisfiable_range() {
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-1"), 0), Unsatisfiable);
        assert_eq!(parse_range(None, 0), Full);
    }
}
