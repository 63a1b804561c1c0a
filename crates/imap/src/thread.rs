//! THREAD=ORDEREDSUBJECT (RFC 5256 3): messages grouped by base subject; in each thread
//! the earliest message (by sent date) is the parent and the others its children in
//! date order; threads in the order of their first message's date.
//!
//! THREAD=REFERENCES (the same RFC's reference threading) is not offered yet.

use crate::sort::SortFields;

/// One message to thread: its number (sequence number or UID, as answered), its sort
/// fields and its place in the mailbox (for ties).
pub struct Threadable {
    /// What the answer names it by.
    pub number: u32,
    /// Base subject and date.
    pub fields: SortFields,
    /// Mailbox order, for ties.
    pub order: usize,
}

/// The THREAD answer's thread list for ORDEREDSUBJECT: `(1 (2)(3))(4)`.
pub fn ordered_subject(mut messages: Vec<Threadable>) -> String {
    // Sorted by base subject, then sent date (then mailbox order).
    messages.sort_by(|a, b| {
        a.fields
            .subject
            .cmp(&b.fields.subject)
            .then(a.fields.date.cmp(&b.fields.date))
            .then(a.order.cmp(&b.order))
    });
    let mut threads: Vec<Vec<&Threadable>> = Vec::new();
    for m in &messages {
        match threads.last_mut() {
            Some(thread) if thread[0].fields.subject == m.fields.subject => thread.push(m),
            _ => threads.push(vec![m]),
        }
    }
    // Threads by their first message's sent date (then mailbox order).
    threads.sort_by(|a, b| {
        a[0].fields
            .date
            .cmp(&b[0].fields.date)
            .then(a[0].order.cmp(&b[0].order))
    });
    let mut out = String::new();
    for thread in threads {
        out.push('(');
        out.push_str(&thread[0].number.to_string());
        match &thread[1..] {
            [] => {}
            [only] => out.push_str(&format!(" {}", only.number)),
            children => {
                out.push(' ');
                for child in children {
                    out.push_str(&format!("({})", child.number));
                }
            }
        }
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(number: u32, subject: &str, date: i64) -> Threadable {
        Threadable {
            number,
            fields: SortFields {
                subject: crate::sort::base_subject(subject),
                date,
                ..SortFields::default()
            },
            order: number as usize,
        }
    }

    #[test]
    fn threads_by_base_subject_parent_first_children_by_date() {
        let answer = ordered_subject(vec![
            m(1, "Hello", 10),
            m(2, "Other", 5),
            m(3, "Re: hello", 30),
            m(4, "Fwd: HELLO", 20),
            m(5, "Re: other", 40),
            m(6, "alone", 50),
        ]);
        assert_eq!(answer, "(2 5)(1 (4)(3))(6)");
        assert_eq!(ordered_subject(Vec::new()), "");
    }
}
