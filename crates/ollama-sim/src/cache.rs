//! The prompt cache, as llama.cpp's server keeps it (Ollama's runner since v0.30), modelled for
//! the sim without the real engine. Each parallel slot holds the tokens of its last request (its
//! KV cache). A request takes the idle slot whose tokens share the longest prefix with its
//! prompt; when a slot moves to another prompt, the state it held is saved to a host-RAM cache
//! of prompt states, and the cached state sharing the longest prefix with the new prompt is
//! restored when it beats what the slot holds. The RAM cache keeps states up to a cap
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

    /// Takes an idle slot for `prompt` (the one sharing the longest prefix, else the least
    /// recently used); saves what it held when the prompt moves it elsewhere, and restores the
    /// cached state that shares more of the prompt, if one does.
    pub fn take(&mut self, prompt: &[Token]) -> Taken {
        self.clock += 1;
        let slot = (0..self.slots.len())
            .filter(|i| !self.slots[*i].busy)
            .max_by_key(|i| {
                (
                    common(&self.slots[*i].tokens, prompt),
                    u64::MAX - self.slots[*i].used,
                )
            })
            .unwrap_or(0);
        let mut held = common(&self.slots[slot].tokens, prompt);
        let moving = held < self.slots[slot].tokens.len();
        if moving && !self.slots[slot].tokens.is_empty() {
            let old = std::mem::take(&mut self.slots[slot].tokens);
            self.save(old);
        }
        let best = self
            .saved
            .iter()
            .enumerate()
            .map(|(i, s)| (common(&s.tokens, prompt), i))
            .max();
        if let Some((n, i)) = best
            && n > held
        {
            let restored = self.saved.remove(i);
            held = n;
            self.slots[slot].tokens = restored.tokens;
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
