//! Link finding: a message's text split into plain text, `http(s)://` links and `@name`
//! mentions, marked up with everything escaped by maud. No other scheme becomes a link.

use maud::{html, Markup};

use crate::domain::mention_at;

/// The `rel` of every link made from a message.
pub const LINK_REL: &str = "noopener noreferrer nofollow ugc";

/// A piece of a message's text.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Link(&'a str),
    Mention(&'a str),
}

/// Splits `text` into plain text, `http(s)://` links and `@name` mentions of `mentions`.
fn pieces<'a>(text: &'a str, mentions: &[String]) -> Vec<Piece<'a>> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let link = find_link(rest);
        let mention = mentions
            .iter()
            .filter_map(|name| mention_at(rest, name).map(|at| (at, name.as_str())))
            .min_by_key(|(at, name)| (*at, std::cmp::Reverse(name.len())));
        match (link, mention) {
            (Some((start, end)), mention) if mention.is_none_or(|(at, _)| start <= at) => {
                out.push(Piece::Text(&rest[..start]));
                out.push(Piece::Link(&rest[start..end]));
                rest = &rest[end..];
            }
            (_, Some((at, name))) => {
                out.push(Piece::Text(&rest[..at]));
                out.push(Piece::Mention(&rest[at..at + 1 + name.len()]));
                rest = &rest[at + 1 + name.len()..];
            }
            _ => {
                out.push(Piece::Text(rest));
                break;
            }
        }
    }
    out.retain(|piece| *piece != Piece::Text(""));
    out
}

/// The first `http://` or `https://` URL in `text` (scheme case-insensitive, at a word start),
/// as a byte range; trailing punctuation stays text.
fn find_link(text: &str) -> Option<(usize, usize)> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("http") {
        let start = from + found;
        let scheme_end = if lower[start..].starts_with("https://") {
            start + 8
        } else if lower[start..].starts_with("http://") {
            start + 7
        } else {
            from = start + 4;
            continue;
        };
        let at_word_start = text[..start].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let end = text[scheme_end..]
            .find(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '`'))
            .map_or(text.len(), |i| scheme_end + i);
        let mut end = end;
        while end > scheme_end {
            let last = text[..end].chars().next_back().unwrap_or(' ');
            let unbalanced_paren =
                last == ')' && text[start..end].matches('(').count() < text[start..end].matches(')').count();
            if matches!(last, '.' | ',' | ';' | ':' | '!' | '?' | '\'' | ']' | '}') || unbalanced_paren {
                end -= last.len_utf8();
            } else {
                break;
            }
        }
        if at_word_start && end > scheme_end {
            return Some((start, end));
        }
        from = scheme_end;
    }
    None
}

/// A message's text with its links and mentions marked up (everything escaped by maud).
pub fn text_with_links(text: &str, mentions: &[String]) -> Markup {
    html! {
        @for piece in pieces(text, mentions) {
            @match piece {
                Piece::Text(text) => (text),
                Piece::Link(url) => a href=(url) rel=(LINK_REL) target="_blank" { (url) },
                Piece::Mention(shown) => span.mention data-name=(&shown[1..]) { (shown) },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_become_links() {
        let html =
            text_with_links("see https://example.com/a?b=1&c=2. and HTTP://x.test/(y) or http://", &[]).into_string();
        assert_eq!(
            html,
            "see <a href=\"https://example.com/a?b=1&amp;c=2\" rel=\"noopener noreferrer nofollow ugc\" \
             target=\"_blank\">https://example.com/a?b=1&amp;c=2</a>. and <a href=\"HTTP://x.test/(y)\" \
             rel=\"noopener noreferrer nofollow ugc\" target=\"_blank\">HTTP://x.test/(y)</a> or http://"
        );
        for text in
            ["javascript:alert(1)", "data:text/html,<b>x</b>", "JaVaScRiPt:alert(1)", "vbscript:x", "xhttp://evil.test"]
        {
            let html = text_with_links(text, &[]).into_string();
            assert!(!html.contains("<a "), "{html}");
        }
        let markup = text_with_links("<a href=\"javascript:x\">", &[]).into_string();
        assert_eq!(markup, "&lt;a href=&quot;javascript:x&quot;&gt;");
        let quoted = text_with_links("http://a.test/\"onmouseover=alert(1)", &[]).into_string();
        assert!(quoted.starts_with("<a href=\"http://a.test/\" "), "{quoted}");
    }

    #[test]
    fn mentions_of_known_names_are_marked() {
        let mentions = vec!["ann marie".to_owned(), "bob".to_owned()];
        let html = text_with_links("hi @ann marie and @bob, not @bobby or me@bob", &mentions).into_string();
        assert_eq!(
            html,
            "hi <span class=\"mention\" data-name=\"ann marie\">@ann marie</span> and \
             <span class=\"mention\" data-name=\"bob\">@bob</span>, not @bobby or me@bob"
        );
    }
}
