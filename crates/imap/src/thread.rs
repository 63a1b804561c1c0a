//! THREAD=ORDEREDSUBJECT (RFC 5256 3): messages grouped by base subject; in each thread
//! the earliest message (by sent date) is the parent and the others its children in
//! date order; threads in the order of their first message's date.
//!
//! THREAD=REFERENCES (RFC 5256 4): threads from Message-ID, References and In-Reply-To
//! (the "JWZ" algorithm as the RFC words it), then root threads with the same base
//! subject merged.

use crate::sort::SortFields;
use std::collections::HashMap;

/// One message to thread: its number (sequence number or UID, as answered), its sort
/// fields and its place in the mailbox (for ties).
pub struct Threadable {
    /// What the answer names it by.
    pub number: u32,
    /// Base subject and date.
    pub fields: SortFields,
    /// Mailbox order, for ties.
    pub order: usize,
    /// Its Message-ID (without angle brackets), if valid.
    pub message_id: Option<String>,
    /// References, oldest first; In-Reply-To's id when there are none.
    pub references: Vec<String>,
    /// Whether its subject carried a reply or forward marker.
    pub reply: bool,
}

/// A thread is at most this deep: the tree is walked recursively, and References come
/// from the client (one message can name thousands, a chain of messages can be as long
/// as the mailbox). A message that would sit deeper starts a thread of its own.
const DEPTH_MAX: usize = 200;

/// References used per message: the last ones, the nearest ancestors.
const REFERENCES_MAX: usize = 64;

#[derive(Default, Clone)]
struct Container {
    message: Option<usize>,
    parent: Option<usize>,
    children: Vec<usize>,
}

struct Tree<'a> {
    messages: &'a [Threadable],
    nodes: Vec<Container>,
}

impl Tree<'_> {
    fn new_node(&mut self) -> usize {
        self.nodes.push(Container::default());
        self.nodes.len() - 1
    }

    /// Whether `a` is `b` or one of its ancestors; also true when `b`'s ancestry is
    /// deeper than [`DEPTH_MAX`] (so no link makes a thread deeper or a loop).
    fn is_ancestor(&self, a: usize, mut b: usize) -> bool {
        for _ in 0..=DEPTH_MAX {
            if a == b {
                return true;
            }
            match self.nodes[b].parent {
                Some(p) => b = p,
                None => return false,
            }
        }
        true
    }

    /// Detaches every container deeper than [`DEPTH_MAX`] into a root of its own, so the
    /// recursive walks below stay shallow. Iterative.
    fn bound_depth(&mut self) {
        let mut visited = vec![false; self.nodes.len()];
        let mut stack: Vec<(usize, usize)> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].parent.is_none())
            .map(|n| (n, 0))
            .collect();
        while let Some((node, depth)) = stack.pop() {
            if std::mem::replace(&mut visited[node], true) {
                continue;
            }
            for child in self.nodes[node].children.clone() {
                if depth + 1 > DEPTH_MAX {
                    self.unlink(child);
                    stack.push((child, 0));
                } else {
                    stack.push((child, depth + 1));
                }
            }
        }
    }

    fn unlink(&mut self, child: usize) {
        if let Some(parent) = self.nodes[child].parent.take() {
            self.nodes[parent].children.retain(|&c| c != child);
        }
    }

    fn link(&mut self, parent: usize, child: usize) {
        self.unlink(child);
        self.nodes[child].parent = Some(parent);
        self.nodes[parent].children.push(child);
    }

    /// The date a container sorts by: its message's, or its first child's.
    fn date(&self, node: usize) -> (i64, usize) {
        match self.nodes[node].message {
            Some(m) => (self.messages[m].fields.date, self.messages[m].order),
            None => self.nodes[node]
                .children
                .first()
                .map_or((i64::MAX, usize::MAX), |&c| self.date(c)),
        }
    }

    /// The message whose subject stands for a container (its own or its first child's).
    fn subject_message(&self, node: usize) -> Option<&Threadable> {
        match self.nodes[node].message {
            Some(m) => Some(&self.messages[m]),
            None => self.nodes[node]
                .children
                .first()
                .and_then(|&c| self.nodes[c].message)
                .map(|m| &self.messages[m]),
        }
    }

    fn sort_children(&mut self, node: usize) {
        let mut children = std::mem::take(&mut self.nodes[node].children);
        for &c in &children {
            self.sort_children(c);
        }
        children.sort_by_key(|&c| self.date(c));
        self.nodes[node].children = children;
    }

    fn write(&self, node: usize, out: &mut String) {
        let container = &self.nodes[node];
        match container.message {
            Some(m) => {
                out.push_str(&self.messages[m].number.to_string());
                match container.children.as_slice() {
                    [] => {}
                    [only] => {
                        out.push(' ');
                        self.write(*only, out);
                    }
                    children => {
                        out.push(' ');
                        for &c in children {
                            out.push('(');
                            self.write(c, out);
                            out.push(')');
                        }
                    }
                }
            }
            None => {
                for &c in &container.children {
                    out.push('(');
                    self.write(c, out);
                    out.push(')');
                }
            }
        }
    }
}

/// A message's Message-ID, its References (In-Reply-To's first id when it has none)
/// and whether its subject is a reply or forward.
pub fn ids_of(m: &mail_parser::Message<'_>) -> (Option<String>, Vec<String>, bool) {
    fn ids(value: &mail_parser::HeaderValue<'_>) -> Vec<String> {
        match value {
            mail_parser::HeaderValue::Text(t) => vec![t.to_string()],
            mail_parser::HeaderValue::TextList(list) => {
                list.iter().map(|t| t.to_string()).collect()
            }
            _ => Vec::new(),
        }
    }
    let message_id = m
        .message_id()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty());
    let mut references = ids(m.references());
    if references.is_empty() {
        references = ids(m.in_reply_to()).into_iter().take(1).collect();
    }
    let extra = references.len().saturating_sub(REFERENCES_MAX);
    references.drain(..extra);
    let reply = crate::sort::base_subject_and_reply(m.subject().unwrap_or("")).1;
    (message_id, references, reply)
}

/// The THREAD answer's thread list for REFERENCES: `(3 6 (4 23)(44 7 96))`.
pub fn references(messages: Vec<Threadable>) -> String {
    let mut messages = messages;
    messages.sort_by_key(|m| m.order);
    let mut tree = Tree {
        messages: &messages,
        nodes: Vec::new(),
    };
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (index, message) in messages.iter().enumerate() {
        // (1) The message's container; a missing or repeated Message-ID gets its own.
        let own = match &message.message_id {
            Some(id) => match by_id.get(id) {
                Some(&node) if tree.nodes[node].message.is_none() => node,
                Some(_) => tree.new_node(),
                None => {
                    let node = tree.new_node();
                    by_id.insert(id.clone(), node);
                    node
                }
            },
            None => tree.new_node(),
        };
        tree.nodes[own].message = Some(index);
        // (2) Link the references in order, parent to child, unless that makes a loop
        // or the child has a parent already.
        let mut previous: Option<usize> = None;
        for reference in &message.references {
            let node = match by_id.get(reference) {
                Some(&node) => node,
                None => {
                    let node = tree.new_node();
                    by_id.insert(reference.clone(), node);
                    node
                }
            };
            if let Some(parent) = previous
                && tree.nodes[node].parent.is_none()
                && !tree.is_ancestor(node, parent)
            {
                tree.link(parent, node);
            }
            previous = Some(node);
        }
        // (3) The message's parent is its last reference (unless that makes a loop).
        match previous {
            Some(parent) if !tree.is_ancestor(own, parent) => tree.link(parent, own),
            _ => tree.unlink(own),
        }
    }
    tree.bound_depth();
    // (B) The root set.
    let mut roots: Vec<usize> = (0..tree.nodes.len())
        .filter(|&n| tree.nodes[n].parent.is_none())
        .collect();
    // (C) Prune empty containers: drop childless ones, promote the children of the rest
    // (at the root only when there is a single child).
    fn prune(tree: &mut Tree<'_>, node: usize, root: bool) -> Vec<usize> {
        let children = std::mem::take(&mut tree.nodes[node].children);
        let mut kept = Vec::new();
        for child in children {
            kept.extend(prune(tree, child, false));
        }
        for &c in &kept {
            tree.nodes[c].parent = Some(node);
        }
        tree.nodes[node].children = kept;
        if tree.nodes[node].message.is_some() {
            return vec![node];
        }
        let children = tree.nodes[node].children.clone();
        if children.is_empty() {
            return Vec::new();
        }
        if root && children.len() > 1 {
            return vec![node];
        }
        for &c in &children {
            tree.nodes[c].parent = None;
        }
        children
    }
    let mut pruned = Vec::new();
    for root in roots.drain(..) {
        pruned.extend(prune(&mut tree, root, true));
    }
    for &r in &pruned {
        tree.nodes[r].parent = None;
    }
    let mut roots = pruned;
    // (D) Sort the root set by date.
    for &r in &roots {
        tree.sort_children(r);
    }
    roots.sort_by_key(|&r| tree.date(r));
    // (E) Merge root threads with the same base subject.
    let mut table: HashMap<String, usize> = HashMap::new();
    for &r in &roots {
        let Some(m) = tree.subject_message(r) else {
            continue;
        };
        if m.fields.subject.is_empty() {
            continue;
        }
        let is_dummy = tree.nodes[r].message.is_none();
        match table.get(&m.fields.subject) {
            None => {
                table.insert(m.fields.subject.clone(), r);
            }
            Some(&old) => {
                let old_dummy = tree.nodes[old].message.is_none();
                let old_reply = tree.subject_message(old).is_some_and(|o| o.reply);
                if (is_dummy && !old_dummy) || (old_reply && !m.reply) {
                    table.insert(m.fields.subject.clone(), r);
                }
            }
        }
    }
    let mut merged_away: Vec<usize> = Vec::new();
    let mut replaced: HashMap<usize, usize> = HashMap::new();
    for &r in &roots {
        let Some(m) = tree.subject_message(r) else {
            continue;
        };
        let subject = m.fields.subject.clone();
        let reply = m.reply;
        let Some(&target) = table.get(&subject) else {
            continue;
        };
        if target == r {
            continue;
        }
        let target_dummy = tree.nodes[target].message.is_none();
        let this_dummy = tree.nodes[r].message.is_none();
        let target_reply = tree.subject_message(target).is_some_and(|t| t.reply);
        if target_dummy && this_dummy {
            for c in std::mem::take(&mut tree.nodes[r].children) {
                tree.nodes[c].parent = None;
                tree.link(target, c);
            }
        } else if target_dummy || (reply && !target_reply) {
            tree.link(target, r);
        } else {
            // A new empty container over both, in the target's place.
            let parent = tree.new_node();
            tree.link(parent, target);
            tree.link(parent, r);
            replaced.insert(target, parent);
            table.insert(subject, parent);
        }
        merged_away.push(r);
    }
    let mut roots: Vec<usize> = roots
        .into_iter()
        .filter(|r| !merged_away.contains(r))
        .map(|r| replaced.get(&r).copied().unwrap_or(r))
        .collect();
    // (F) Sort every set of siblings, then the roots, by date.
    for &r in &roots {
        tree.sort_children(r);
    }
    roots.sort_by_key(|&r| tree.date(r));
    let mut out = String::new();
    for r in roots {
        out.push('(');
        tree.write(r, &mut out);
        out.push(')');
    }
    out
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
        let (base, reply) = crate::sort::base_subject_and_reply(subject);
        Threadable {
            number,
            fields: SortFields {
                subject: base,
                date,
                ..SortFields::default()
            },
            order: number as usize,
            message_id: Some(format!("m{number}@x")),
            references: Vec::new(),
            reply,
        }
    }

    fn r(number: u32, subject: &str, date: i64, refs: &[u32]) -> Threadable {
        Threadable {
            references: refs.iter().map(|n| format!("m{n}@x")).collect(),
            ..m(number, subject, date)
        }
    }

    #[test]
    fn references_threads_replies_under_what_they_reference() {
        // 1 <- 2 <- 4, 1 <- 3; 5 refers to a message not here (7); 6 unrelated; 8 has
        // the same subject as 6 and is a reply without references: merged under 6.
        let answer = references(vec![
            m(1, "plan", 10),
            r(2, "Re: plan", 20, &[1]),
            r(3, "Re: plan", 30, &[1]),
            r(4, "Re: plan", 40, &[1, 2]),
            r(5, "Re: lost", 50, &[7]),
            m(6, "lunch", 60),
            m(8, "Re: lunch", 70),
        ]);
        assert_eq!(answer, "(1 (2 4)(3))(5)(6 8)");
        // A loop in References does not loop the algorithm.
        let looped = references(vec![r(1, "a", 1, &[2]), r(2, "a", 2, &[1])]);
        assert!(looped.contains('1') && looped.contains('2'), "{looped}");
        assert_eq!(references(Vec::new()), "");
    }

    #[test]
    fn hostile_reference_chains_stay_shallow_and_lose_no_message() {
        // 5,000 messages, each a reply to the one before: the walk would recurse 5,000
        // deep.
        let chain: Vec<Threadable> = (1..=5000)
            .map(|n| {
                if n == 1 {
                    m(1, "x", 1)
                } else {
                    r(n, "Re: x", n as i64, &[n - 1])
                }
            })
            .collect();
        let answer = references(chain);
        for n in [1u32, 200, 201, 2500, 5000] {
            assert!(
                answer.contains(&format!(" {n} "))
                    || answer.contains(&format!("({n} "))
                    || answer.contains(&format!(" {n})"))
                    || answer.contains(&format!("({n})")),
                "{n} missing"
            );
        }
        // One message naming 20,000 references (ids_of keeps the nearest 64; the
        // threading copes with all of them anyway): merged under its original by
        // subject, as a reply.
        let mut many = r(2, "Re: y", 2, &[]);
        many.references = (0..20_000).map(|i| format!("ref{i}@x")).collect();
        assert_eq!(references(vec![m(1, "y", 1), many]), "(1 2)");
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
