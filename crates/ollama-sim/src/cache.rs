//! The prompt cache, as llama.cpp's server keeps it (Ollama's runner since v0.30), modelled for
//! the sim without the real engine. Each parallel slot holds the tokens of its last request (its
//! KV cache). A request takes the idle slot whose tokens share the largest part of its prompt;
//! when that slot would lose more than half of what it holds (or none shares enough), the state
//! it held is saved to a host-RAM cache of prompt states, and the cached state sharing more of
//! the new prompt is restored when it beats what the slot holds (see [`PromptCache::take`]). The RAM cache keeps states up to a cap
//! (`LLAMA_ARG_CACHE_RAM` in MiB, default 8192 as llama-server's; 0: no cache; -1: no cap),
//! dropping the least recently used. Only the tokens past the restored prefix cost prefill
//! time. A cached state holds real memory (`SIM_KV_BYTES_PER_TOKEN` per token), so an
//! unbounded cache grows the process until its cgroup's limit, as the real one does.

/// A token: the sim's tokens are words, hashed to 32 bits (they travel as JSON numbers in a
/// generate answer's `context`).
pub type Token = u64;

/// The tokens of a text (words).
pub fn tokens(text: &str) -> Vec<Token> {
    text.split_whitespace()
        .map(|w| {
            // FNV-1a: stable across runs, cheap.
            w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            }) & 0xffff_ffff
        })
        .collect()
}

/// The share of a prompt an idle slot must hold to be chosen for it (llama-server's
/// `--slot-prompt-similarity` default; Ollama does not set it).
const SLOT_PROMPT_SIMILARITY: f64 = 0.1;

fn common(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Debug)]
struct Saved {
    tokens: Vec<Token>,
    _memory: Vec<u8>,
    bytes: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Slot {
    tokens: Vec<Token>,
    busy: bool,
    used: u64,
}

/// The cache of one runner.
#[derive(Debug)]
pub struct PromptCache {
    slots: Vec<Slot>,
    saved: Vec<Saved>,
    /// `None`: no cap.
    cap: Option<u64>,
    per_token: u64,
    clock: u64,
}

/// A request's place: its slot, and how many leading tokens of its prompt were restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The slot.
    pub slot: usize,
    /// Prompt tokens that cost nothing.
    pub cached: usize,
}

impl PromptCache {
    /// A cache for `slots` parallel slots, `cap_mib` as `--cache-ram` takes it, states costing
    /// `per_token` bytes a token.
    pub fn new(slots: usize, cap_mib: i64, per_token: u64) -> PromptCache {
        PromptCache {
            slots: (0..slots.max(1)).map(|_| Slot::default()).collect(),
            saved: Vec::new(),
            cap: u64::try_from(cap_mib).ok().map(|mib| mib << 20),
            per_token,
            clock: 0,
        }
    }

    /// Bytes the cached states hold.
    pub fn bytes(&self) -> u64 {
        self.saved.iter().map(|s| s.bytes).sum()
    }

    /// Prompt states in the RAM cache.
    pub fn states(&self) -> usize {
        self.saved.len()
    }

    /// Takes an idle slot for `prompt` and restores what the engine would, by llama-server's
    /// rules: the idle slot sharing the largest part of the prompt (more than a tenth,
    /// `--slot-prompt-similarity`), else the least recently used. The RAM cache is consulted only
    /// when the slot came by LRU, or when the new prompt would drop more than half of what the
    /// slot holds: then the slot's state is saved, and the cached state that keeps more of
    /// itself (at least a quarter) and covers more of the prompt is restored. So a shared
    /// system prompt that makes up more than half of the slot's prompt keeps the cache from
    /// being consulted: the turn re-evaluates everything past the system prompt.
    pub fn take(&mut self, prompt: &[Token]) -> Taken {
        self.clock += 1;
        let share = |n: usize, of: usize| n as f64 / of.max(1) as f64;
        let idle: Vec<usize> = (0..self.slots.len())
            .filter(|i| !self.slots[*i].busy)
            .collect();
        let by_prefix = idle
            .iter()
            .copied()
            .filter(|i| !self.slots[*i].tokens.is_empty())
            .map(|i| {
                (
                    share(common(&self.slots[i].tokens, prompt), prompt.len()),
                    i,
                )
            })
            .filter(|(sim, _)| *sim > SLOT_PROMPT_SIMILARITY)
            .fold(None, |best: Option<(f64, usize)>, (sim, i)| match best {
                Some((b, _)) if b >= sim => best,
                _ => Some((sim, i)),
            });
        let (slot, consult) = match by_prefix {
            Some((_, i)) => {
                let s = &self.slots[i];
                (i, share(common(&s.tokens, prompt), s.tokens.len()) < 0.5)
            }
            None => {
                let lru = idle
                    .iter()
                    .copied()
                    .min_by_key(|i| self.slots[*i].used)
                    .unwrap_or(0);
                (lru, true)
            }
        };
        let mut held = common(&self.slots[slot].tokens, prompt);
        if consult {
            let current = self.slots[slot].tokens.clone();
            if !current.is_empty() {
                self.save(current.clone());
            }
            // The base to beat: what the slot keeps of itself and covers of the prompt.
            let mut keep_best = if current.is_empty() {
                -1.0
            } else {
                share(held, current.len())
            };
            let mut sim_best = share(held, prompt.len());
            let mut best = None;
            for (i, saved) in self.saved.iter().enumerate() {
                let n = common(&saved.tokens, prompt);
                let keep = share(n, saved.tokens.len());
                let sim = share(n, prompt.len());
                if keep >= 0.25 && keep_best < keep && sim_best < sim {
                    (keep_best, sim_best, best) = (keep, sim, Some((i, n)));
                }
            }
            if let Some((i, n)) = best {
                let restored = self.saved.remove(i);
                held = n;
                self.slots[slot].tokens = restored.tokens;
            }
        }
        let s = &mut self.slots[slot];
        s.tokens.truncate(held);
        s.busy = true;
        s.used = self.clock;
        // (llama.cpp evaluates at least the last token.)
        Taken {
            slot,
            cached: held.min(prompt.len().saturating_sub(1)),
        }
    }

    /// The request on `slot` is done: the slot holds `tokens` (its prompt and what it made).
    pub fn give_back(&mut self, slot: usize, tokens: Vec<Token>) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.tokens = tokens;
            s.busy = false;
        }
    }

    fn save(&mut self, tokens: Vec<Token>) {
        let Some(cap) = self.cap.or(Some(u64::MAX)).filter(|c| *c > 0) else {
            return;
        };
        let bytes = tokens.len() as u64 * self.per_token;
        if bytes > cap {
            return;
        }
        while self.bytes() + bytes > cap {
            let Some(lru) = (0..self.saved.len()).min_by_key(|i| self.saved[*i].used) else {
                break;
            };
            self.saved.remove(lru);
        }
        // A state is never saved twice: the same tokens replace the older copy.
        self.saved.retain(|s| s.tokens != tokens);
        let memory = crate::runner::hold_memory(usize::try_from(bytes).unwrap_or(0));
        self.clock += 1;
        self.saved.push(Saved {
            tokens,
            _memory: memory,
            bytes,
            used: self.clock,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_hits_its_slot_and_others_come_back_from_ram() {
        let mut c = PromptCache::new(1, 8192, 0);
        let a1 = tokens("system doc-a question one");
        let t = c.take(&a1);
        assert_eq!(t.cached, 0);
        let mut held = a1.clone();
        held.extend(tokens("answer one"));
        c.give_back(t.slot, held);
        // The next turn of A: everything held so far is restored.
        let a2 = tokens("system doc-a question one answer one question two");
        assert_eq!(c.take(&a2).cached, 6);
        c.give_back(0, a2.clone());
        // B moves the slot: A's state goes to RAM, the shared system prompt stays.
        let b1 = tokens("system doc-b question");
        assert_eq!(c.take(&b1).cached, 1);
        c.give_back(0, b1);
        assert_eq!(c.states(), 1);
        // A again: restored from RAM.
        let a3 = tokens("system doc-a question one answer one question two answer two more");
        assert_eq!(c.take(&a3).cached, 8);
    }

    /// As measured on llama-server (one slot, three conversations in turn, a new question each
    /// round): with a system prompt of 750 words and documents of 400, every returning turn
    /// evaluated ~410 tokens again (the slot kept the system prompt, the cache was not
    /// consulted); with 200 and 700, a returning turn evaluated 8.
    #[test]
    fn a_shared_prefix_over_half_the_slot_keeps_the_cache_unconsulted() {
        let run = |system: usize, document: usize| {
            let mut c = PromptCache::new(1, 8192, 0);
            let words = |n: usize, tag: &str| -> Vec<Token> {
                (0..n).map(|i| tokens(&format!("{tag}{i}"))[0]).collect()
            };
            let mut conversations: Vec<Vec<Token>> = (0..3)
                .map(|c| [words(system, "s"), words(document, &format!("d{c}-"))].concat())
                .collect();
            let mut evaluated = Vec::new();
            for round in 0..3 {
                for conversation in &mut conversations {
                    conversation.extend(words(8, &format!("q{round}-")));
                    let t = c.take(conversation);
                    evaluated.push(conversation.len() - t.cached);
                    c.give_back(t.slot, conversation.clone());
                }
            }
            evaluated
        };
        let shared = run(750, 400);
        assert!(
            shared[3..].iter().all(|n| *n > 400),
            "re-evaluated: {shared:?}"
        );
        let own = run(200, 700);
        assert!(own[3..].iter().all(|n| *n <= 9), "restored: {own:?}");
    }

    #[test]
    fn the_ram_cap_drops_the_least_recently_used() {
        // 10 tokens of 1 MiB each: a 25 MiB cap holds two such states.
        let mut c = PromptCache::new(1, 25, 1 << 20);
        for i in 0..4 {
            let p: Vec<Token> = (0..10).map(|t| t + i * 100).collect();
            let s = c.take(&p).slot;
            c.give_back(s, p);
        }
        assert_eq!(c.states(), 2, "the two most recent of three saved");
        assert_eq!(c.bytes(), 20 << 20);
        let off = PromptCache::new(1, 0, 1 << 20);
        assert_eq!(off.bytes(), 0);
    }

    #[test]
    fn idle_slots_are_chosen_by_prefix() {
        let mut c = PromptCache::new(2, 8192, 0);
        let a = tokens("a b c d");
        let b = tokens("x y z");
        let sa = c.take(&a).slot;
        let sb = c.take(&b).slot;
        assert_ne!(sa, sb);
        c.give_back(sa, a.clone());
        c.give_back(sb, b.clone());
        assert_eq!(
            c.take(&tokens("x y z w")),
            Taken {
                slot: sb,
                cached: 3
            }
        );
    }
}
