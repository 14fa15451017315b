/* A v2 COW file's clustered op records turned into table columns, in C.
 *
 * snapshot/_cow_reader.py reads a v2 file's op stream; the records of plain
 * data ops (copy, replace, zero, xor) and the cluster ops that end each
 * cluster go to the op table here, cluster after cluster, the reads
 * (pread) included (CowReader._walk_v2). In Python that loop cost about
 * 10 ms of the 62k-op start-up of a merge (a call, a read and columns a
 * cluster). This does the same per-op work (the rules checked, the columns
 * and data offsets made) and stops before the first record it does not
 * take: any other type (sequence, label, footer, an unused slot), a record
 * breaking a rule, a short read or the end of the file. The reader's
 * per-op path then reads that record and names the fault, as without this
 * module: one set of messages.
 *
 *     walk_v2(fd, pos, data_pos, cluster_ops, data_start, file_size,
 *             compression, columns, valid_compression, copy, replace,
 *             zero, xor, cluster, source_mask)
 *       -> (pos, data_pos, compression, data_ops)
 *
 * pos: the next record's offset, data_pos: the data stream's position
 * there, compression: the file's so far (-1 for none yet), all as the
 * reader has them, and the same after the records taken (data_ops: how
 * many of them were data ops, not cluster ops). Records are read
 * min(cluster_ops, what the file has left) at a time, as the reader does.
 * columns: the op table's array.array columns in OpTable.columns() order
 * (type B, new_block Q, source Q, data_length I, compression B, offset Q,
 * data_offset q, factor B); the rows of the records taken are appended to
 * them (frombytes, a small batch at a time: no second copy of the table).
 *
 * Memory first touched costs here (a page fault, 3-10 us a page on the
 * machines measured: more than the work on it at start-up), so results
 * go straight into the caller's arrays, through small buffers that the
 * allocator reuses, rather than into a bytes object copied once more.
 * valid_compression: 256 bytes, 1 where a compression value is known;
 * copy .. cluster: the op type values; source_mask: the largest source.
 *
 * The merge order (snapshot/_cow_order.py: check_unique_rows,
 * merge_order_rows) is built and checked here too, where the Python rules
 * cost about 1 us an op (60 ms of a 62k-op merge's start-up):
 *
 *     rank_rows(types, new_blocks, factors, rows, meta, ranked) -> bool
 *     order_rows(types, new_blocks, sources, rows, ranked, sequence,
 *                file_order_rest, block_size, ordered, copy_type, order)
 *       -> bool
 *
 * types/factors: u8 columns, new_blocks/sources: u64 columns (the op
 * table's, indexed by row); rows, ranked, sequence, the results: u32
 * arrays. rank_rows appends rows sorted by new block to ranked (an
 * array.array of u32) and returns True, or False, appending nothing, when
 * two of them start at one block or overlap (meta: 256 bytes, 1 for a type
 * writing none) or a new block does not fit 32 bits (the Python rules then
 * sort). order_rows writes to order (a writable buffer of as many u32 as
 * ranked) the rows the sequence names first (in its order;
 * no sequence: the rows of an ordered type, in file order), then the rest
 * (ranked; file order when file_order_rest), and returns True, or False when a
 * sequence entry names no op or one named before, an ordered op (ordered:
 * 256 bytes, 1 for copy/xor) comes after another, or one reads a block an
 * earlier one writes (a copy's source is a block, an xor's a byte offset).
 * On False the Python functions walk the file again and name the fault:
 * one set of messages.
 *
 *     column_max(values, signed, types, wanted, plus) -> int or None
 *
 * The largest of a u64 (i64 when signed) column, each value plus the row's
 * u32 in plus (empty: nothing added), over the rows whose type wanted
 * marks (256 bytes; empty: every row), None for no such row: the reader's
 * and the merge's range checks (OpTable.largest), where Python's max boxes
 * every value (2-4 ms a column of 62k ops).
 *
 *     rows_of(types, wanted, rows) -> None
 *
 * Appends to rows (an array.array of u32) the rows whose type wanted marks
 * (256 bytes), in order: the table's data rows (OpTable.data_rows; 1.7 ms
 * of Python at 62k ops).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <unistd.h>

#define OP_SIZE 20

static uint64_t le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return le64toh(v);
}

/* Append nbytes at data to array.array column (its frombytes); 0, or -1 with an exception. */
static int append(PyObject *column, const void *data, Py_ssize_t nbytes)
{
    PyObject *done = PyObject_CallMethod(column, "frombytes", "y#", (const char *)data, nbytes);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
}

/* Rows of taken records not yet appended to the table's columns. */
struct rows {
    Py_ssize_t n, cap;
    uint8_t *type, *comp;
    uint32_t *length;
    uint64_t *block, *source, *offset;
    int64_t *data_offset;
};

#define ROWS_BATCH 8192 /* each column's buffer under 128 KiB: the heap's, reused, not fresh pages (mmap) */

static void rows_free(struct rows *r)
{
    PyMem_Free(r->type);
    PyMem_Free(r->comp);
    PyMem_Free(r->length);
    PyMem_Free(r->block);
    PyMem_Free(r->source);
    PyMem_Free(r->offset);
    PyMem_Free(r->data_offset);
}

static int rows_alloc(struct rows *r)
{
    r->n = 0;
    r->cap = ROWS_BATCH;
    r->type = PyMem_Malloc(ROWS_BATCH);
    r->comp = PyMem_Malloc(ROWS_BATCH);
    r->length = PyMem_Malloc(ROWS_BATCH * 4);
    r->block = PyMem_Malloc(ROWS_BATCH * 8);
    r->source = PyMem_Malloc(ROWS_BATCH * 8);
    r->offset = PyMem_Malloc(ROWS_BATCH * 8);
    r->data_offset = PyMem_Malloc(ROWS_BATCH * 8);
    if (!r->type || !r->comp || !r->length || !r->block || !r->source || !r->offset || !r->data_offset) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Append the pending rows to the 8 columns (array.frombytes each); 0 or -1 with an exception. */
static int rows_flush(struct rows *r, PyObject *columns, const uint8_t *zeros)
{
    if (!r->n)
        return 0;
    const void *data[8] = {r->type, r->block, r->source, r->length, r->comp, r->offset, r->data_offset, zeros};
    const Py_ssize_t width[8] = {1, 8, 8, 4, 1, 8, 8, 1};
    for (int c = 0; c < 8; c++)
        if (append(PyTuple_GET_ITEM(columns, c), data[c], r->n * width[c]) < 0)
            return -1;
    r->n = 0;
    return 0;
}

static PyObject *walk_v2(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, copy_type, replace_type, zero_type, xor_type, cluster_type;
    long long pos, data_pos, data_start, file_size, compression;
    unsigned long cluster_ops;
    unsigned long long source_mask;
    PyObject *columns;
    Py_buffer valid;
    if (!PyArg_ParseTuple(args, "iLLkLLLO!y*iiiiiK:walk_v2", &fd, &pos, &data_pos, &cluster_ops, &data_start,
                          &file_size, &compression, &PyTuple_Type, &columns, &valid, &copy_type, &replace_type,
                          &zero_type, &xor_type, &cluster_type, &source_mask))
        return NULL;
    PyObject *result = NULL;
    unsigned char *buf = NULL;
    uint8_t *zeros = NULL;
    struct rows rows = {0};
    Py_ssize_t data_ops = 0;
    if (PyTuple_GET_SIZE(columns) != 8 || valid.len != 256 || !cluster_ops || pos < 0 || data_pos < 0 ||
        file_size < 0) {
        PyErr_SetString(PyExc_ValueError, "walk_v2: 8 columns, a 256-byte table, clusters and positions");
        goto done;
    }
    zeros = PyMem_Calloc(ROWS_BATCH, 1);
    if (rows_alloc(&rows) < 0 || zeros == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *ok = valid.buf;
    size_t buf_size = 0;
    /* data_pos grows by up to cluster_ops * 20 a cluster: past this bound the reader's Python ints go on */
    const long long data_pos_limit = LLONG_MAX / 2;
    for (;;) {
        long long left = pos < file_size ? (file_size - pos) / OP_SIZE : 0;
        long long to_read = left < (long long)cluster_ops ? left : (long long)cluster_ops;
        if (to_read <= 0 || data_pos > data_pos_limit)
            break;
        size_t want = (size_t)to_read * OP_SIZE;
        if (want > buf_size) {
            PyMem_Free(buf);
            buf = PyMem_Malloc(want);
            buf_size = buf ? want : 0;
            if (buf == NULL) {
                PyErr_NoMemory();
                goto done;
            }
        }
        ssize_t got;
        do
            got = pread(fd, buf, want, (off_t)pos);
        while (got < 0 && errno == EINTR);
        if (got != (ssize_t)want)
            break; /* an error or a file that shrank: the reader's own read says which */
        int stop = 0;
        const unsigned char *rec = buf;
        for (long long i = 0; i < to_read; i++, rec += OP_SIZE) {
            int type = rec[0], comp = rec[1];
            uint32_t length = (uint32_t)rec[2] | ((uint32_t)rec[3] << 8);
            uint64_t new_block = le64(rec + 4), source = le64(rec + 12);
            int plain = type == copy_type || type == replace_type || type == zero_type || type == xor_type;
            if ((!plain && type != cluster_type) || (comp && (!ok[comp] || (compression >= 0 && compression != comp))) ||
                source > source_mask) {
                stop = 1;
                break;
            }
            int64_t where = -1;
            if (type == cluster_type) {
                if (length) {
                    stop = 1;
                    break;
                }
            } else if (new_block > 0xFFFFFFFFull) {
                stop = 1;
                break;
            } else if (type == xor_type || type == replace_type) {
                long long at = type == xor_type ? data_pos : (long long)source;
                if (!length || at < data_start || at + (long long)length > file_size) {
                    stop = 1;
                    break;
                }
                where = at;
            } else if (length) {
                stop = 1;
                break;
            }
            if (comp)
                compression = comp;
            if (rows.n == rows.cap && rows_flush(&rows, columns, zeros) < 0)
                goto done;
            rows.type[rows.n] = (uint8_t)type;
            rows.comp[rows.n] = (uint8_t)comp;
            rows.length[rows.n] = length;
            rows.block[rows.n] = new_block;
            rows.source[rows.n] = source;
            rows.offset[rows.n] = (uint64_t)pos;
            rows.data_offset[rows.n] = where;
            rows.n++;
            if (type == cluster_type) {
                pos += OP_SIZE + (long long)source;
                data_pos += (long long)cluster_ops * OP_SIZE;
                break; /* the cluster's end: the next read starts at pos */
            }
            pos += OP_SIZE;
            data_pos += length;
            data_ops++;
        }
        if (stop)
            break;
        /* no cluster op among them: the records go on at pos (a stream, read a cluster's worth at a time) */
    }
    if (rows_flush(&rows, columns, zeros) < 0)
        goto done;
    result = Py_BuildValue("(LLLn)", pos, data_pos, compression, data_ops);
done:
    rows_free(&rows);
    PyMem_Free(zeros);
    PyMem_Free(buf);
    PyBuffer_Release(&valid);
    return result;
}


/* Sort ``keys`` (n, each new block << 32 | row) by block: an LSD radix
 * sort of the high 32 bits, 11 bits a pass (the counts stay in L1: 16-bit
 * digits cost twice as much at 62k ops), a pass skipped where every key has
 * the same digit (qsort with a comparator cost 4 ms for 62k ops). Rows
 * with one block are not ordered by row: rank_rows answers False for them.
 * ``tmp``: room for n keys; ``count``: RADIX_DIGITS counters; returns the
 * sorted copy (keys or tmp). */
#define RADIX_BITS 11
#define RADIX_DIGITS (1 << RADIX_BITS)
static uint64_t *sort_by_block(uint64_t *keys, uint64_t *tmp, Py_ssize_t n, uint32_t *count)
{
    for (int shift = 32; shift < 64; shift += RADIX_BITS) {
        const uint64_t mask = RADIX_DIGITS - 1;
        memset(count, 0, RADIX_DIGITS * sizeof *count);
        for (Py_ssize_t i = 0; i < n; i++)
            count[(keys[i] >> shift) & mask]++;
        if (n && count[(keys[0] >> shift) & mask] == (uint32_t)n)
            continue;
        uint32_t at = 0;
        for (int d = 0; d < RADIX_DIGITS; d++) {
            uint32_t c = count[d];
            count[d] = at;
            at += c;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            tmp[count[(keys[i] >> shift) & mask]++] = keys[i];
        uint64_t *swap = keys;
        keys = tmp;
        tmp = swap;
    }
    return keys;
}

/* Check that ``rows`` (u32) index columns of ``len`` rows. */
static int rows_fit(const Py_buffer *rows, Py_ssize_t len)
{
    const uint32_t *r = rows->buf;
    for (Py_ssize_t i = 0; i < rows->len / 4; i++)
        if ((Py_ssize_t)r[i] >= len)
            return 0;
    return 1;
}

static PyObject *rank_rows(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer types, blocks, factors, rows, meta;
    PyObject *ranked;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*O:rank_rows", &types, &blocks, &factors, &rows, &meta, &ranked))
        return NULL;
    PyObject *result = NULL;
    uint64_t *keys = NULL, *tmp = NULL;
    uint32_t count[RADIX_DIGITS];
    Py_ssize_t len = types.len, n = rows.len / 4;
    if (blocks.len != len * 8 || factors.len != len || rows.len % 4 || meta.len != 256 || !rows_fit(&rows, len) ||
        n > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "rank_rows: columns of different lengths, rows out of range or a bad table");
        goto done;
    }
    keys = PyMem_Malloc((n ? n : 1) * sizeof *keys);
    tmp = PyMem_Malloc((n ? n : 1) * sizeof *tmp);
    if (keys == NULL || tmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *ty = types.buf, *fac = factors.buf, *is_meta = meta.buf;
    const uint64_t *nb = blocks.buf;
    const uint32_t *r = rows.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (nb[r[i]] > UINT32_MAX) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        keys[i] = nb[r[i]] << 32 | r[i];
    }
    const uint64_t *sorted = sort_by_block(keys, tmp, n, count);
    unsigned __int128 prev_end = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t block = sorted[i] >> 32;
        uint32_t row = (uint32_t)sorted[i];
        /* a tie (a block written twice, or a metadata row's block) is left to Python, which orders it by row */
        if (i && (block < prev_end || block == sorted[i - 1] >> 32)) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        prev_end = (unsigned __int128)block + (is_meta[ty[row]] ? 0 : (unsigned __int128)1 << (fac[row] & 63));
    }
    /* the rows, into the buffer the sort left free */
    uint32_t *out = (uint32_t *)(sorted == keys ? tmp : keys);
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = (uint32_t)sorted[i];
    if (append(ranked, out, n * 4) == 0)
        result = Py_NewRef(Py_True);
done:
    PyMem_Free(keys);
    PyMem_Free(tmp);
    PyBuffer_Release(&types);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&factors);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&meta);
    return result;
}

/* New block -> the row writing it: open addressing over a power-of-two
 * table at most half full, of rows (the new blocks are compared in the
 * table's column: no copy of them; a bisection per lookup cost 3x as
 * much, its reads all over the column). */
struct block_index {
    const uint64_t *blocks; /* the table's new_block column */
    uint32_t *slots;         /* a row, UINT32_MAX empty */
    uint64_t mask;
    int shift;
};

static int index_blocks(struct block_index *ix, const uint64_t *blocks, const uint32_t *rows, Py_ssize_t n)
{
    int bits = 1;
    while (((Py_ssize_t)1 << bits) < 2 * n)
        bits++;
    ix->blocks = blocks;
    ix->mask = ((uint64_t)1 << bits) - 1;
    ix->shift = 64 - bits;
    ix->slots = PyMem_Malloc(((size_t)1 << bits) * sizeof *ix->slots);
    if (ix->slots == NULL)
        return -1;
    memset(ix->slots, 0xff, ((size_t)1 << bits) * sizeof *ix->slots);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = (blocks[rows[i]] * 0x9E3779B97F4A7C15ull) >> ix->shift;
        while (ix->slots[h] != UINT32_MAX)
            h = (h + 1) & ix->mask;
        ix->slots[h] = rows[i];
    }
    return 0;
}

/* The row writing ``block``, or -1 (new blocks are unique: rank_rows). */
static int64_t find_block(const struct block_index *ix, uint64_t block)
{
    uint64_t h = (block * 0x9E3779B97F4A7C15ull) >> ix->shift;
    for (uint32_t row; (row = ix->slots[h]) != UINT32_MAX; h = (h + 1) & ix->mask)
        if (ix->blocks[row] == block)
            return row;
    return -1;
}

static PyObject *order_rows(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer types, blocks, sources, rows, ranked, sequence, ordered_table, out;
    int file_order_rest, copy_type;
    unsigned long long block_size;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*pKy*iw*:order_rows", &types, &blocks, &sources, &rows, &ranked,
                          &sequence, &file_order_rest, &block_size, &ordered_table, &copy_type, &out))
        return NULL;
    PyObject *result = NULL;
    struct block_index ix = {NULL, NULL, 0, 0};
    uint32_t *position = NULL;
    uint8_t *named = NULL;
    Py_ssize_t len = types.len, n = ranked.len / 4, nseq = sequence.len / 4;
    if (blocks.len != len * 8 || sources.len != len * 8 || rows.len != ranked.len || ranked.len % 4 ||
        sequence.len % 4 || ordered_table.len != 256 || !block_size || !rows_fit(&rows, len) ||
        !rows_fit(&ranked, len) || len >= UINT32_MAX || out.len != ranked.len) {
        PyErr_SetString(PyExc_ValueError, "order_rows: columns of different lengths, rows out of range or a bad table");
        goto done;
    }
    const uint8_t *ty = types.buf, *is_ordered = ordered_table.buf;
    const uint64_t *nb = blocks.buf, *src = sources.buf;
    const uint32_t *r = rows.buf, *rk = ranked.buf, *seq = sequence.buf;
    position = PyMem_Calloc(len ? len : 1, sizeof *position);
    named = PyMem_Calloc(len ? len : 1, 1); /* by row */
    if (position == NULL || named == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint32_t *order = out.buf;
    Py_ssize_t k = 0;
    if (index_blocks(&ix, nb, rk, n) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (nseq) {
        for (Py_ssize_t i = 0; i < nseq; i++) {
            int64_t row = find_block(&ix, seq[i]);
            if (row < 0 || named[row] || k == n)
                goto fault;
            named[row] = 1;
            order[k++] = (uint32_t)row;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (!named[rk[i]])
                order[k++] = rk[i];
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            if (is_ordered[ty[r[i]]])
                order[k++] = r[i];
        const uint32_t *rest = file_order_rest ? r : rk;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!is_ordered[ty[rest[i]]])
                order[k++] = rest[i];
    }
    /* the ordered ops first, none reading a block an earlier one writes (position: merge position + 1) */
    Py_ssize_t prefix = 0;
    while (prefix < n && is_ordered[ty[order[prefix]]])
        prefix++;
    for (Py_ssize_t i = prefix; i < n; i++)
        if (is_ordered[ty[order[i]]])
            goto fault;
    for (Py_ssize_t i = 0; i < prefix; i++) {
        uint32_t row = order[i];
        uint64_t first = src[row], second = UINT64_MAX;
        int two = 0;
        if (ty[row] != copy_type) {
            two = first % block_size != 0;
            first /= block_size;
            second = first + 1;
        }
        for (int j = 0; j <= two; j++) {
            int64_t writer = find_block(&ix, j ? second : first);
            if (writer >= 0 && position[writer])
                goto fault;
        }
        position[row] = (uint32_t)(i + 1);
    }
    result = Py_NewRef(Py_True);
    goto done;
fault:
    result = Py_NewRef(Py_False);
done:
    PyMem_Free(ix.slots);
    PyMem_Free(position);
    PyMem_Free(named);
    PyBuffer_Release(&types);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&sources);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&ranked);
    PyBuffer_Release(&sequence);
    PyBuffer_Release(&ordered_table);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *column_max(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer values, types, wanted, plus;
    int is_signed;
    if (!PyArg_ParseTuple(args, "y*py*y*y*:column_max", &values, &is_signed, &types, &wanted, &plus))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = values.len / 8;
    if (values.len % 8 || types.len != n || (wanted.len != 256 && wanted.len != 0) ||
        (plus.len != n * 4 && plus.len != 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "column_max: a column of 8-byte values, a type and a u32 (or none) a row, a 256-byte table");
        goto done;
    }
    const uint8_t *ty = types.buf, *want = wanted.len ? wanted.buf : NULL;
    const uint32_t *add = plus.len ? plus.buf : NULL;
    int found = 0;
    /* in 128 bits: a u64 plus a u32 may not fit 64 */
    __int128 top = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (want && !want[ty[i]])
            continue;
        __int128 v = is_signed ? (__int128)((const int64_t *)values.buf)[i] : (__int128)((const uint64_t *)values.buf)[i];
        if (add)
            v += add[i];
        if (!found || v > top) {
            top = v;
            found = 1;
        }
    }
    if (!found)
        result = Py_NewRef(Py_None);
    else if (top >= 0 && top <= (__int128)UINT64_MAX)
        result = PyLong_FromUnsignedLongLong((unsigned long long)top);
    else if (top < 0)
        result = PyLong_FromLongLong((long long)top);
    else { /* past 64 bits: high and low halves */
        PyObject *high = PyLong_FromUnsignedLongLong((unsigned long long)(top >> 64));
        PyObject *shift = PyLong_FromLong(64);
        PyObject *low = PyLong_FromUnsignedLongLong((unsigned long long)top);
        PyObject *moved = high && shift ? PyNumber_Lshift(high, shift) : NULL;
        result = moved && low ? PyNumber_Add(moved, low) : NULL;
        Py_XDECREF(high);
        Py_XDECREF(shift);
        Py_XDECREF(low);
        Py_XDECREF(moved);
    }
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&types);
    PyBuffer_Release(&wanted);
    PyBuffer_Release(&plus);
    return result;
}

static PyObject *rows_of(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer types, wanted;
    PyObject *rows;
    if (!PyArg_ParseTuple(args, "y*y*O:rows_of", &types, &wanted, &rows))
        return NULL;
    PyObject *result = NULL;
    if (wanted.len != 256 || types.len > (Py_ssize_t)UINT32_MAX + 1) {
        PyErr_SetString(PyExc_ValueError, "rows_of: a 256-byte table, at most 2^32 rows");
        goto done;
    }
    const uint8_t *ty = types.buf, *want = wanted.buf;
    uint32_t batch[2048];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < types.len; i++) {
        if (!want[ty[i]])
            continue;
        batch[k++] = (uint32_t)i;
        if (k == 2048) {
            if (append(rows, batch, sizeof batch) < 0)
                goto done;
            k = 0;
        }
    }
    if (append(rows, batch, k * 4) == 0)
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&types);
    PyBuffer_Release(&wanted);
    return result;
}

static PyMethodDef methods[] = {
    {"walk_v2", walk_v2, METH_VARARGS, "v2 clustered op records -> the table's columns, as far as they go (see the file's doc)"},
    {"rank_rows", rank_rows, METH_VARARGS, "rows sorted by new block appended to an array; False for two writing one block"},
    {"order_rows", order_rows, METH_VARARGS, "the checked merge order of rows into a buffer; False where a rule is broken"},
    {"column_max", column_max, METH_VARARGS, "the largest value of a column over rows of some types, or None"},
    {"rows_of", rows_of, METH_VARARGS, "the rows whose type a table marks, appended to an array of u32"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cow_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cow_native(void)
{
    return PyModule_Create(&module);
}
