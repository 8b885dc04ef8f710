//! Stop strings matched on streamed text: a stop string never reaches the client, and
//! text that cannot start one is released at once.

/// Watches streamed text for stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// Whether the stop string that ends the answer is part of it (vLLM's
    /// `include_stop_str_in_output`).
    include: bool,
}

/// What to do with a chunk of generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to send now.
    pub emit: String,
    /// A stop string was found; generation ends after `emit`.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for these (non-empty) stop strings, which the answer leaves out.
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new(), include: false }
    }

    /// The same matcher, keeping the stop string that ends the answer in it.
    pub fn including_stop(self) -> Self {
        Self { include: true, ..self }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopStep {
        self.held.push_str(text);
        // The earliest match; of those starting there, the longest.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)));
        if let Some((at, len)) = first {
            let end = if self.include { at + len } else { at };
            let emit = self.held[..end].to_string();
            self.held.clear();
            return StopStep { emit, stopped: true };
        }
        // Hold back the longest tail that is the beginning of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let emit = self.held[..keep].to_string();
        self.held.drain(..keep);
        StopStep { emit, stopped: false }
    }

    /// Releases held text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for c in chunks {
            let step = m.push(c);
            out.push(step.emit);
            if step.stopped {
                return (out, true, String::new());
            }
        }
        let rest = m.finish();
        (out, false, rest)
    }

    #[test]
    fn stop_spanning_chunks_is_cut_and_never_emitted() {
        let (out, stopped, _) = run(&["END"], &["Hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello ");
        assert_eq!(out[0], "Hello ", "text that cannot start a stop is released at once");
    }

    #[test]
    fn false_start_is_released() {
        let (out, stopped, rest) = run(&["END"], &["a E", "x", "y"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "Ex", "y"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["world", "lo w"], &["hel", "lo world"]);
        assert!(stopped);
        assert_eq!(out.concat(), "hel");
    }

    #[test]
    fn a_stop_kept_in_the_answer_ends_it_whole() {
        let mut m = StopMatcher::new(&["lo w".into(), "lo".into(), "END".into()]).including_stop();
        assert_eq!(m.push("hel"), StopStep { emit: "he".into(), stopped: false });
        assert_eq!(
            m.push("lo world"),
            StopStep { emit: "llo w".into(), stopped: true },
            "the longest at the earliest place"
        );
    }

    #[test]
    fn held_tail_comes_out_at_finish() {
        let (out, stopped, rest) = run(&["###"], &["ok #", "#"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "ok ");
        assert_eq!(rest, "##");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let (out, stopped, _) = run(&["é!"], &["caf", "é", "é!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "café");
    }
}
