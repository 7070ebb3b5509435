//! kubectl-style plain tables: left-aligned columns separated by three spaces, no borders.
//! Written by hand: it is a dozen lines, and table crates default to boxed layouts.

use std::fmt;

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let last = r.len().saturating_sub(1);
            for (i, c) in r.iter().enumerate() {
                if i == last {
                    writeln!(f, "{c}")?;
                } else {
                    write!(f, "{c:<w$}   ", w = widths.get(i).copied().unwrap_or(0))?;
                }
            }
        }
        Ok(())
    }
}
