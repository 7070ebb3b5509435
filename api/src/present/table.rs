//! kubectl-style plain tables: left-aligned columns separated by three spaces, no borders.
//! Written by hand: it is a dozen lines, and table crates default to boxed layouts.

use std::fmt;

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Print the header line (a watch prints it once, above the first rows).
    show_header: bool,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            show_header: true,
        }
    }

    /// Leaves the header line out.
    pub fn no_header(&mut self) {
        self.show_header = false;
    }

    /// Adds a row; cells are shown with control characters escaped (they may be what a
    /// device reported: it must not drive the operator's terminal).
    pub fn row(&mut self, row: Vec<String>) {
        self.rows.push(
            row.into_iter()
                .map(|c| crate::present::printable::escaped(&c).into_owned())
                .collect(),
        );
    }

    /// Drops the named columns (the `-o wide` ones, in the narrow view).
    pub fn hide(&mut self, columns: &[&str]) {
        let keep: Vec<bool> = self
            .header
            .iter()
            .map(|h| !columns.contains(&h.as_str()))
            .collect();
        let filter = |r: &mut Vec<String>| {
            let mut i = 0;
            r.retain(|_| {
                i += 1;
                keep.get(i - 1).copied().unwrap_or(true)
            });
        };
        filter(&mut self.header);
        self.rows.iter_mut().for_each(filter);
    }

    /// Shortens the last column (with `…`) so that no line is wider than `width` characters;
    /// the other columns stay whole.
    pub fn fit(&mut self, width: usize) {
        let Some(last) = self.header.len().checked_sub(1) else {
            return;
        };
        let before: usize = self.widths().iter().take(last).map(|w| w + GAP.len()).sum();
        let room = width.saturating_sub(before).max(10);
        for r in &mut self.rows {
            if let Some(c) = r.get_mut(last) {
                if c.chars().count() > room {
                    *c = c.chars().take(room - 1).chain(['…']).collect();
                }
            }
        }
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        widths
    }
}

const GAP: &str = "   ";

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        let header = self.show_header.then_some(&self.header);
        for r in header.into_iter().chain(&self.rows) {
            let last = r.len().saturating_sub(1);
            for (i, c) in r.iter().enumerate() {
                if i == last {
                    writeln!(f, "{c}")?;
                } else {
                    write!(f, "{c:<w$}{GAP}", w = widths.get(i).copied().unwrap_or(0))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_hide_and_the_last_one_fits() {
        let mut t = Table::new(&["NAME", "WIDE", "MESSAGE"]);
        t.row(vec!["a".into(), "x".into(), "m".repeat(40)]);
        t.row(vec!["bbbb".into(), "y".into(), "short".into()]);
        t.hide(&["WIDE"]);
        t.fit(27);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME   MESSAGE");
        assert_eq!(lines[1], format!("a      {}…", "m".repeat(19)));
        assert_eq!(lines[2], "bbbb   short");
        assert!(lines.iter().all(|l| l.chars().count() <= 27), "{text}");
    }
}
