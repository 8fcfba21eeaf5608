//! The least-recently-used order of the cache's unpinned resident entries.

const NIL: u32 = u32::MAX;

/// A doubly linked list of slots in least-recently-used order (front = oldest), threaded
/// through per-slot arrays so every operation is O(1) and allocation-free.
pub(super) struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
}

impl Lru {
    pub(super) fn new(slots: usize) -> Lru {
        Lru {
            prev: vec![NIL; slots],
            next: vec![NIL; slots],
            linked: vec![false; slots],
            head: NIL,
            tail: NIL,
        }
    }

    pub(super) fn front(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    pub(super) fn next(&self, slot: u32) -> Option<u32> {
        let next = self.next[slot as usize];
        (next != NIL).then_some(next)
    }

    pub(super) fn push_back(&mut self, slot: u32) {
        debug_assert!(!self.linked[slot as usize]);
        let at = slot as usize;
        self.linked[at] = true;
        self.prev[at] = self.tail;
        self.next[at] = NIL;
        match self.tail {
            NIL => self.head = slot,
            tail => self.next[tail as usize] = slot,
        }
        self.tail = slot;
    }

    pub(super) fn remove(&mut self, slot: u32) {
        let at = slot as usize;
        if !self.linked[at] {
            return;
        }
        let (prev, next) = (self.prev[at], self.next[at]);
        match prev {
            NIL => self.head = next,
            prev => self.next[prev as usize] = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.prev[next as usize] = prev,
        }
        self.linked[at] = false;
    }

    /// Moves a linked slot to the most recently used end.
    pub(super) fn touch(&mut self, slot: u32) {
        if self.linked[slot as usize] {
            self.remove(slot);
            self.push_back(slot);
        }
    }
}
