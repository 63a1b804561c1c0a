//! Site addressing: generating a recipient's SMTP address from the site's template.
//!
//! The classic tokens: `%g` given name, `%s` surname, `%i` initials, `%d` display name,
//! `%m` alias (mailbox name), `%Ng` / `%Ns` / `%Ni` / `%Nd` / `%Nm` the first N
//! characters, `%rxy` replace character x with y from here on (`%rx` followed by the end
//! or another `%` deletes x), `%%` a literal percent. Letters with diacritics become
//! their ASCII base letters (`deunicode`), then characters that are not valid in an
//! address are dropped. Pure functions: the writer and the import validator both use
//! them on a snapshot, so a dry run generates exactly what the real run will.

use std::collections::HashSet;

/// The name parts a template draws on.
#[derive(Debug, Clone, Copy, Default)]
pub struct NameParts<'a> {
    /// Given name (`%g`).
    pub given_name: &'a str,
    /// Surname (`%s`).
    pub surname: &'a str,
    /// Initials (`%i`).
    pub initials: &'a str,
    /// Display name (`%d`).
    pub display_name: &'a str,
    /// Alias, the mailbox name (`%m`).
    pub alias: &'a str,
}

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template has no `@` followed by a domain.
    #[error("the template must have the form <local part>@<domain>, e.g. %g.%s@example.com")]
    NoDomain,
    /// A `%` is followed by something that is not a token.
    #[error("unknown token {0:?} (tokens: %g %s %i %d %m %Ng %Ns %rxy %%)")]
    UnknownToken(String),
    /// The template ends in the middle of a token.
    #[error("the template ends inside a token")]
    Truncated,
}

/// Characters kept in a generated local part: RFC 5322 atext and dots. Anything else
/// (spaces, accents, punctuation with meaning) is dropped, as the classic server did.
fn valid_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c)
}

/// Checks a template's syntax without a recipient.
pub fn check_template(template: &str) -> Result<(), TemplateError> {
    let parts = NameParts {
        given_name: "G",
        surname: "S",
        initials: "I",
        display_name: "D",
        alias: "m",
    };
    expand_local(template, &parts).map(|_| ())
}

/// The domain of a template (the text after its last `@`), lower-cased; tokens are not
/// expanded in domains.
pub fn template_domain(template: &str) -> Option<String> {
    let (_, domain) = template.rsplit_once('@')?;
    (!domain.is_empty() && !domain.contains('%')).then(|| domain.to_ascii_lowercase())
}

/// Expands the local part (everything before the last `@`).
fn expand_local(template: &str, parts: &NameParts<'_>) -> Result<String, TemplateError> {
    let (local, domain) = template.rsplit_once('@').ok_or(TemplateError::NoDomain)?;
    if domain.is_empty() || domain.contains('%') {
        return Err(TemplateError::NoDomain);
    }
    let mut out = String::new();
    let mut replacements: Vec<(char, Option<char>)> = Vec::new();
    let mut chars = local.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut count = String::new();
        while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
            count.push(d);
            chars.next();
        }
        let token = chars.next().ok_or(TemplateError::Truncated)?;
        let limit: Option<usize> = count.parse().ok();
        let value = match token {
            '%' if count.is_empty() => {
                out.push('%');
                continue;
            }
            'g' => parts.given_name,
            's' => parts.surname,
            'i' => parts.initials,
            'd' => parts.display_name,
            'm' => parts.alias,
            'r' if count.is_empty() => {
                let from = chars.next().ok_or(TemplateError::Truncated)?;
                let to = match chars.peek() {
                    None | Some('%') => None,
                    Some(_) => chars.next(),
                };
                replacements.push((from, to));
                continue;
            }
            other => return Err(TemplateError::UnknownToken(format!("%{count}{other}"))),
        };
        let value: String = match limit {
            Some(n) => value.chars().take(n).collect(),
            None => value.to_string(),
        };
        out.push_str(&value);
    }
    // Replacements apply to the whole expansion, in the order given.
    for (from, to) in replacements {
        out = out
            .chars()
            .filter_map(|c| if c == from { to } else { Some(c) })
            .collect();
    }
    // Letters with diacritics become their ASCII base letters (José -> Jose) before
    // whatever is still not valid in an address is dropped.
    let cleaned: String = deunicode::deunicode(&out)
        .chars()
        .filter(|c| valid_local_char(*c))
        .collect();
    // Dots may not lead, trail or double in a dot-atom.
    let cleaned = cleaned
        .split('.')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    Ok(cleaned)
}

/// Expands `template` for a recipient: `local@domain`, or `None` when nothing valid is
/// left of the local part (the caller reports it).
pub fn expand(template: &str, parts: &NameParts<'_>) -> Result<Option<String>, TemplateError> {
    let local = expand_local(template, parts)?;
    let domain = template_domain(template).ok_or(TemplateError::NoDomain)?;
    Ok((!local.is_empty()).then(|| format!("{local}@{domain}")))
}

/// Resolves a collision predictably: the first of `local@d`, `local2@d`, `local3@d` ...
/// for which `taken` is false. Returns the address and whether a suffix was needed.
pub fn first_free(address: &str, taken: impl Fn(&str) -> bool) -> (String, bool) {
    if !taken(address) {
        return (address.to_string(), false);
    }
    let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
    for n in 2u32.. {
        let candidate = format!("{local}{n}@{domain}");
        if !taken(&candidate) {
            return (candidate, true);
        }
    }
    unreachable!("some suffix is free")
}

/// [`first_free`] against a set of lower-cased addresses.
pub fn first_free_in(address: &str, taken: &HashSet<String>) -> (String, bool) {
    first_free(address, |a| taken.contains(&a.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark() -> NameParts<'static> {
        NameParts {
            given_name: "Mark",
            surname: "Clark",
            initials: "MC",
            display_name: "Mark Clark",
            alias: "mclark",
        }
    }

    #[test]
    fn token_expansion_table() {
        let jose = NameParts {
            given_name: "José María",
            surname: "O'Núñez-Díaz",
            initials: "JM",
            display_name: "José María O'Núñez-Díaz",
            alias: "jmnunez",
        };
        let cases: &[(&str, &NameParts<'_>, &str)] = &[
            ("%g.%s@co.com", &mark(), "Mark.Clark@co.com"),
            ("%1g%s@co.com", &mark(), "MClark@co.com"),
            ("%g%1s@co.com", &mark(), "MarkC@co.com"),
            ("%3g.%3s@co.com", &mark(), "Mar.Cla@co.com"),
            ("%i@co.com", &mark(), "MC@co.com"),
            ("%m@co.com", &mark(), "mclark@co.com"),
            ("%d@co.com", &mark(), "MarkClark@co.com"),
            ("%r .%d@co.com", &mark(), "Mark.Clark@co.com"),
            ("%rk%g@co.com", &mark(), "Mar@co.com"),
            ("%raA%g@co.com", &mark(), "MArk@co.com"),
            ("%g%%%s@co.com", &mark(), "Mark%Clark@co.com"),
            ("first.%s@co.com", &mark(), "first.Clark@co.com"),
            // Non-ASCII and punctuation that is not valid in an address is dropped.
            ("%g.%s@co.com", &jose, "JoseMaria.O'Nunez-Diaz@co.com"),
            ("%r %g@co.com", &jose, "JoseMaria@co.com"),
            ("%r'%s@co.com", &jose, "ONunez-Diaz@co.com"),
            (
                "%g@co.com",
                &NameParts {
                    given_name: "Zoë (Zo) <x>",
                    ..NameParts::default()
                },
                "ZoeZox@co.com",
            ),
            ("%m@co.com", &jose, "jmnunez@co.com"),
        ];
        for (template, parts, expected) in cases {
            assert_eq!(
                expand(template, parts).unwrap().as_deref(),
                Some(*expected),
                "{template}"
            );
        }
    }

    #[test]
    fn empty_parts_and_dots() {
        let nobody = NameParts {
            alias: "x",
            ..NameParts::default()
        };
        assert_eq!(expand("%g.%s@co.com", &nobody).unwrap(), None);
        let given_only = NameParts {
            given_name: "Ann",
            ..NameParts::default()
        };
        assert_eq!(
            expand("%g.%s@co.com", &given_only).unwrap().as_deref(),
            Some("Ann@co.com")
        );
    }

    #[test]
    fn template_errors() {
        assert_eq!(check_template("%g.%s"), Err(TemplateError::NoDomain));
        assert_eq!(check_template("%g@"), Err(TemplateError::NoDomain));
        assert_eq!(
            check_template("%x@co.com"),
            Err(TemplateError::UnknownToken("%x".into()))
        );
        assert_eq!(check_template("%3@co.com"), Err(TemplateError::Truncated));
        assert_eq!(check_template("%ra@co.com"), Ok(()));
        assert_eq!(
            template_domain("%g.%s@Example.COM").as_deref(),
            Some("example.com")
        );
    }

    #[test]
    fn collisions_get_a_numeric_suffix() {
        let taken: HashSet<String> = ["mark.clark@co.com", "mark.clark2@co.com"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            first_free_in("Mark.Clark@co.com", &taken),
            ("Mark.Clark3@co.com".to_string(), true)
        );
        assert_eq!(
            first_free_in("Ann.Lee@co.com", &taken),
            ("Ann.Lee@co.com".to_string(), false)
        );
    }
}
