//! A byte queue with a read offset: appended at the back, consumed from the front, compacted
//! lazily so a slow peer does not cost a memmove per partial write.

#[derive(Debug, Default)]
pub(crate) struct ByteQueue {
    buf: Vec<u8>,
    head: usize,
}

impl ByteQueue {
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.compact_if_worth_it(data.len());
        self.buf.extend_from_slice(data);
    }

    /// Puts `data` in front of what is queued (a header decided after bytes arrived).
    pub(crate) fn prepend(&mut self, data: &[u8]) {
        let mut buf = Vec::with_capacity(data.len() + self.len());
        buf.extend_from_slice(data);
        buf.extend_from_slice(self.as_slice());
        self.buf = buf;
        self.head = 0;
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.buf.len());
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        }
    }

    /// Frees the memory of an idle connection's buffer.
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
            self.head = 0;
        }
    }

    fn compact_if_worth_it(&mut self, incoming: usize) {
        if self.head > 0
            && self.head >= self.len()
            && self.buf.len() + incoming > self.buf.capacity()
        {
            self.buf.drain(..self.head);
            self.head = 0;
        }
    }
}

/// Lets rustls's `write_tls` append straight into a queue.
impl std::io::Write for ByteQueue {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_consume() {
        let mut q = ByteQueue::default();
        q.push(b"hello ");
        q.consume(2);
        assert_eq!(q.as_slice(), b"llo ");
        q.push(b"world");
        assert_eq!(q.as_slice(), b"llo world");
        q.consume(100);
        assert!(q.is_empty());
    }
}
