'use strict'
// nsqjs's Writer and Reader against the real knsq-broker. Each test starts its own broker
// (see harness.js) and checks what the client library observes: the messages handed to its
// handlers (body, id, attempts, timing) and, where useful, /stats.

const assert = require('node:assert/strict')
const {brokerTest, Deliveries, sleep, within} = require('./harness')

const TOPIC = 'compat_topic'
const inFlightCleared = (c) => c !== null && c.in_flight_count === 0

brokerTest('PUB delivers the message with attempts 1', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.collectingReader(TOPIC, 'ch', deliveries)
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()

  const publishedAtNs = BigInt(Date.now()) * 1000000n
  await clients.publish(writer, TOPIC, 'hello knsq')

  const [got] = await deliveries.waitCount(1)
  assert.equal(got.body, 'hello knsq')
  assert.equal(got.attempts, 1)
  assert.match(got.id, /^[0-9a-f]{16}$/)
  const skewNs = got.message.timestamp - publishedAtNs
  assert.ok(skewNs > -5000000000n && skewNs < 5000000000n, `timestamp ${got.message.timestamp} is not the publish time in ns`)

  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the FIN to clear in-flight')
  assert.equal(chan.message_count, 1)
  assert.equal(chan.depth, 0)
  assert.equal((await broker.topicStats(TOPIC)).message_count, 1)
  clients.assertNoErrors()
})

brokerTest('MPUB delivers every message once', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.collectingReader(TOPIC, 'ch', deliveries, {maxInFlight: 20})
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()

  const bodies = Array.from({length: 100}, (_, i) => `mpub-${i}`)
  await clients.publish(writer, TOPIC, bodies) // an array of several messages is sent as MPUB

  await deliveries.waitCount(100)
  await sleep(300) // a duplicate would arrive right behind the batch
  assert.deepEqual(deliveries.bodies().sort(), [...bodies].sort())
  assert.ok(deliveries.items.every((d) => d.attempts === 1))
  assert.equal(new Set(deliveries.items.map((d) => d.id)).size, 100, 'message IDs are not unique')
  assert.equal((await broker.topicStats(TOPIC)).message_count, 100)
  clients.assertNoErrors()
})

brokerTest('DPUB delivers no earlier than due', {}, async ({broker, clients}) => {
  const delayMs = 1500
  const deliveries = new Deliveries()
  clients.collectingReader(TOPIC, 'ch', deliveries)
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()

  const sentAt = performance.now()
  await clients.deferPublish(writer, TOPIC, ['deferred'], delayMs)
  await clients.publish(writer, TOPIC, 'immediate')

  const [first] = await deliveries.waitCount(1)
  assert.equal(first.body, 'immediate', 'the deferred message overtook an immediate one')
  assert.equal((await broker.channelStats(TOPIC, 'ch')).deferred_count, 1)

  const [, deferred] = await deliveries.waitCount(2, delayMs + 5000)
  assert.equal(deferred.body, 'deferred')
  assert.equal(deferred.attempts, 1)
  const waited = deferred.at - sentAt
  assert.ok(waited >= delayMs, `deferred message delivered after ${waited.toFixed(0)} ms, before its ${delayMs} ms delay`)
  assert.ok(waited < delayMs + 2000, `deferred message delivered ${waited.toFixed(0)} ms after DPUB`)
  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the FIN to clear in-flight')
  assert.equal(chan.deferred_count, 0)
  clients.assertNoErrors()
})

brokerTest('requeue(0) redelivers with incremented attempts', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts < 3) message.requeue(0, false) // REQ <id> 0
    else message.finish()
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'retry me')

  await deliveries.waitCount(3)
  assert.deepEqual(deliveries.items.map((d) => d.attempts), [1, 2, 3])
  assert.equal(new Set(deliveries.items.map((d) => d.id)).size, 1, 'a requeued message must keep its ID')
  assert.ok(deliveries.items.every((d) => d.body === 'retry me'))

  const chan = await broker.waitForChannel(
    TOPIC, 'ch', (c) => inFlightCleared(c) && c.requeue_count === 2, 'two requeues and a FIN'
  )
  assert.equal(chan.depth, 0)
  assert.equal(chan.deferred_count, 0)
  assert.equal(chan.timeout_count, 0)
  await sleep(300)
  assert.equal(deliveries.items.length, 3, 'a finished message was delivered again')
  clients.assertNoErrors()
})

brokerTest('requeue(delay) redelivers after the delay with attempts 2', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts === 1) message.requeue(1000, true) // REQ <id> 1000, with client backoff
    else message.finish()
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'later')

  const [first] = await deliveries.waitCount(1)
  const deferredChan = await broker.waitForChannel(
    TOPIC, 'ch', (c) => c !== null && c.deferred_count === 1, 'the requeued message to be deferred'
  )
  assert.equal(deferredChan.in_flight_count, 0)
  const [, second] = await deliveries.waitCount(2, 6000)
  assert.equal(second.id, first.id)
  assert.equal(second.attempts, 2)
  const waited = second.at - first.at
  assert.ok(waited >= 950, `requeued with a 1000 ms delay but redelivered after ${waited.toFixed(0)} ms`)
  assert.ok(waited < 3000, `requeued with a 1000 ms delay but redelivered after ${waited.toFixed(0)} ms`)
  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the FIN to clear in-flight')
  assert.equal(chan.requeue_count, 1)
  assert.equal(chan.deferred_count, 0)
  clients.assertNoErrors()
})

brokerTest('requeue() uses the Reader requeueDelay', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts === 1) message.requeue() // delay = requeueDelay
    else message.finish()
  }, {requeueDelay: 700})
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'default delay')

  const [first, second] = await deliveries.waitCount(2, 6000)
  assert.equal(second.id, first.id)
  assert.equal(second.attempts, 2)
  const waited = second.at - first.at
  assert.ok(waited >= 650, `requeueDelay is 700 ms but redelivered after ${waited.toFixed(0)} ms`)
  assert.ok(waited < 3000, `requeueDelay is 700 ms but redelivered after ${waited.toFixed(0)} ms`)
  clients.assertNoErrors()
})

brokerTest('maxAttempts discards a message requeued past it', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  const discarded = []
  let onDiscard
  const discardedOnce = new Promise((resolve) => { onDiscard = resolve })
  const reader = clients.reader(TOPIC, 'ch', (message, r) => {
    deliveries.add(message, r)
    message.requeue(0, false) // always fails
  }, {maxAttempts: 2})
  reader.on('discard', (message) => {
    discarded.push(message.attempts)
    onDiscard()
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'poison')

  await within(10000, discardedOnce, 'the discard event')
  assert.deepEqual(deliveries.items.map((d) => d.attempts), [1, 2])
  assert.deepEqual(discarded, [3], 'the third delivery must carry attempts 3 and be discarded')
  // The Reader finishes a discarded message: nothing is left in the channel.
  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the auto-FIN of the discarded message')
  assert.equal(chan.depth, 0)
  assert.equal(chan.deferred_count, 0)
  assert.equal(chan.requeue_count, 2)
  clients.assertNoErrors()
})

brokerTest('TOUCH keeps a message past msg-timeout', {brokerArgs: ['--msg-timeout=2s']}, async ({broker, clients}) => {
  const holdForMs = 4500 // more than twice the msg timeout
  const deliveries = new Deliveries()
  let onDone
  const done = new Promise((resolve) => { onDone = resolve })
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts !== 1) return message.finish()
    const touching = setInterval(() => message.touch(), 400)
    setTimeout(() => {
      clearInterval(touching)
      message.finish()
      onDone()
    }, holdForMs)
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'slow work')

  await deliveries.waitCount(1)
  await within(holdForMs + 5000, done, 'the handler to finish')
  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the FIN to clear in-flight')
  assert.deepEqual(deliveries.items.map((d) => d.attempts), [1], 'a touched message was redelivered')
  assert.equal(chan.timeout_count, 0)
  assert.equal(chan.depth, 0)
  clients.assertNoErrors() // would include E_TOUCH_FAILED / E_FIN_FAILED
})

brokerTest('an unfinished message is redelivered after msg-timeout', {brokerArgs: ['--msg-timeout=2s']}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts > 1) message.finish() // the first delivery is never answered
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'forgotten')

  const [first] = await deliveries.waitCount(1)
  assert.equal((await broker.channelStats(TOPIC, 'ch')).in_flight_count, 1)
  const [, second] = await deliveries.waitCount(2, 8000)
  assert.equal(second.id, first.id)
  assert.equal(second.body, 'forgotten')
  assert.equal(second.attempts, 2)
  const waited = second.at - first.at
  assert.ok(waited >= 1800, `msg-timeout is 2s but the message was redelivered after ${waited.toFixed(0)} ms`)
  assert.ok(waited < 4000, `msg-timeout is 2s but the message was redelivered after ${waited.toFixed(0)} ms`)
  const chan = await broker.waitForChannel(TOPIC, 'ch', inFlightCleared, 'the FIN to clear in-flight')
  assert.equal(chan.timeout_count, 1)
  assert.equal(chan.requeue_count, 0)
  clients.assertNoErrors()
})

brokerTest('two consumers on one channel share every message once', {}, async ({broker, clients}) => {
  const count = 40
  const deliveries = new Deliveries()
  // Each consumer holds its message for 20 ms (RDY 1), so the other one must take some.
  const slowHandler = (name) => (message) => {
    deliveries.add(message, name)
    setTimeout(() => message.finish(), 20)
  }
  clients.reader(TOPIC, 'shared', slowHandler('a'))
  clients.reader(TOPIC, 'shared', slowHandler('b'))
  await broker.waitForConsumers(TOPIC, 'shared', 2)
  const writer = await clients.writer()

  const bodies = Array.from({length: count}, (_, i) => `shared-${i}`)
  await clients.publish(writer, TOPIC, bodies)

  await deliveries.waitCount(count, 15000)
  const chan = await broker.waitForChannel(
    TOPIC, 'shared', (c) => inFlightCleared(c) && c.depth === 0, 'every FIN'
  )
  await sleep(300)
  const perReader = {a: [], b: []}
  for (const d of deliveries.items) perReader[d.reader].push(d.body)
  assert.ok(perReader.a.length > 0 && perReader.b.length > 0, `one consumer got nothing: ${JSON.stringify(perReader)}`)
  assert.deepEqual(deliveries.bodies().sort(), [...bodies].sort(), 'the union is not every message exactly once')
  assert.ok(deliveries.items.every((d) => d.attempts === 1))
  assert.equal(chan.message_count, count)
  assert.deepEqual(
    chan.clients.map((c) => c.finish_count).sort((x, y) => x - y),
    [perReader.a.length, perReader.b.length].sort((x, y) => x - y)
  )
  clients.assertNoErrors()
})

brokerTest('two channels each receive every message', {}, async ({broker, clients}) => {
  const count = 30
  const first = new Deliveries()
  const second = new Deliveries()
  clients.collectingReader(TOPIC, 'first', first, {maxInFlight: 10})
  clients.collectingReader(TOPIC, 'second', second, {maxInFlight: 10})
  await broker.waitForConsumers(TOPIC, 'first', 1)
  await broker.waitForConsumers(TOPIC, 'second', 1)
  const writer = await clients.writer()

  const bodies = Array.from({length: count}, (_, i) => `fanout-${i}`)
  await clients.publish(writer, TOPIC, bodies.slice(0, 10))
  for (const body of bodies.slice(10)) await clients.publish(writer, TOPIC, body)

  await first.waitCount(count)
  await second.waitCount(count)
  await sleep(300)
  assert.deepEqual(first.bodies().sort(), [...bodies].sort())
  assert.deepEqual(second.bodies().sort(), [...bodies].sort())
  const ids = (d) => Object.fromEntries(d.items.map((x) => [x.body, x.id]))
  assert.deepEqual(ids(first), ids(second), "each channel's copy of a message must carry the same ID")

  const topic = await broker.topicStats(TOPIC)
  assert.equal(topic.message_count, count)
  assert.deepEqual(topic.channels.map((c) => c.channel_name).sort(), ['first', 'second'])
  assert.ok(topic.channels.every((c) => c.message_count === count))
  clients.assertNoErrors()
})

brokerTest('an ephemeral channel receives and disappears after its consumer leaves', {}, async ({broker, clients}) => {
  const channel = 'tmp#ephemeral'
  const deliveries = new Deliveries()
  const reader = clients.collectingReader(TOPIC, channel, deliveries)
  await broker.waitForConsumers(TOPIC, channel, 1)
  const writer = await clients.writer()
  for (let i = 0; i < 3; i++) await clients.publish(writer, TOPIC, `eph-${i}`)

  await deliveries.waitCount(3)
  assert.deepEqual(deliveries.bodies().sort(), ['eph-0', 'eph-1', 'eph-2'])
  await broker.waitForChannel(TOPIC, channel, inFlightCleared, 'the FINs to clear in-flight')
  clients.assertNoErrors()

  reader.close()
  await broker.waitForChannel(TOPIC, channel, (c) => c === null, 'the ephemeral channel to be deleted after its consumer left')
  assert.notEqual(await broker.topicStats(TOPIC), null, 'a normal topic must survive the deletion of its ephemeral channel')
})

brokerTest('the Reader messageTimeout from IDENTIFY governs redelivery', {}, async ({broker, clients}) => {
  // The broker's default msg-timeout is 60 s; the Reader negotiates 1 s in IDENTIFY.
  const deliveries = new Deliveries()
  clients.reader(TOPIC, 'ch', (message, reader) => {
    deliveries.add(message, reader)
    if (message.attempts > 1) message.finish() // the first delivery is never answered
  }, {messageTimeout: 1000})
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, 'short lease')

  const [first, second] = await deliveries.waitCount(2, 6000)
  assert.equal(second.id, first.id)
  assert.equal(second.attempts, 2)
  const waited = second.at - first.at
  assert.ok(waited >= 800 && waited < 3000, `messageTimeout 1000 ms negotiated, but redelivered after ${waited.toFixed(0)} ms`)
  clients.assertNoErrors()
})

brokerTest('heartbeats at the negotiated interval keep idle connections open', {}, async ({broker, clients}) => {
  const deliveries = new Deliveries()
  const reader = clients.collectingReader(TOPIC, 'ch', deliveries, {heartbeatInterval: 1})
  let readerClosed = false
  reader.on('nsqd_closed', () => { readerClosed = true })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer({heartbeatInterval: 1})
  let writerClosed = false
  writer.closed.then(() => { writerClosed = true })

  await sleep(3500) // idle: longer than the 2 s read deadline of two heartbeats
  assert.ok(reader.heartbeatsAnswered >= 2, `${reader.heartbeatsAnswered} heartbeats answered in 3.5 s at a 1 s interval`)
  assert.equal(readerClosed, false, 'the idle reader connection was closed')
  assert.equal(writerClosed, false, 'the idle writer connection was closed')
  assert.equal((await broker.channelStats(TOPIC, 'ch')).clients.length, 1)

  await clients.publish(writer, TOPIC, 'still here')
  await deliveries.waitCount(1)
  assert.deepEqual(deliveries.bodies(), ['still here'])
  clients.assertNoErrors()
})

for (const compression of ['deflate', 'snappy']) {
  brokerTest(`clients requesting ${compression} still work`, {}, async ({broker, clients}) => {
    // With the broker's defaults the feature is negotiated; tls_compression.test.js checks that in /stats.
    const deliveries = new Deliveries()
    clients.collectingReader(TOPIC, 'ch', deliveries, {[compression]: true})
    await broker.waitForConsumers(TOPIC, 'ch', 1)
    const writer = await clients.writer({[compression]: true})
    const bodies = Array.from({length: 5}, (_, i) => `${compression}-${i}`.repeat(20))
    await clients.publish(writer, TOPIC, bodies)
    await deliveries.waitCount(5)
    assert.deepEqual(deliveries.bodies().sort(), [...bodies].sort())
    clients.assertNoErrors()
  })
}

brokerTest('a message of max-msg-size round-trips byte for byte', {}, async ({broker, clients}) => {
  const payload = Buffer.alloc(1024 * 1024) // 1 MiB = the default --max-msg-size, every byte value
  for (let i = 0; i < payload.length; i++) payload[i] = i % 256
  const received = []
  let onReceived
  const got = new Promise((resolve) => { onReceived = resolve })
  clients.reader(TOPIC, 'ch', (message) => {
    received.push(Buffer.from(message.body))
    message.finish()
    onReceived()
  })
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer()
  await clients.publish(writer, TOPIC, payload)
  await within(10000, got, 'the 1 MiB message')
  assert.equal(received.length, 1)
  assert.equal(received[0].length, payload.length)
  assert.ok(received[0].equals(payload), 'the body differs from what was published')
  clients.assertNoErrors()
})

brokerTest('fatal publish errors reach the Writer and close its connection',
  {brokerArgs: ['--max-req-timeout=1s', '--max-msg-size=1024']}, async ({broker, clients}) => {
    let writer = await clients.writer()
    await assert.rejects(clients.deferPublish(writer, TOPIC, ['too far ahead'], 5000), (err) => {
      assert.equal(err.message, 'E_INVALID DPUB timeout 5000 out of range 0-1000')
      return true
    })
    await within(5000, writer.closed, 'the broker to close the connection after a fatal error')

    writer = await clients.writer()
    await assert.rejects(clients.publish(writer, TOPIC, 'x'.repeat(1025)), (err) => {
      assert.equal(err.message, 'E_BAD_MESSAGE PUB message too big 1025 > 1024')
      return true
    })
    await within(5000, writer.closed, 'the broker to close the connection after a fatal error')

    const topic = await broker.topicStats(TOPIC)
    assert.ok(topic === null || topic.message_count === 0, JSON.stringify(topic))
    clients.errors = [] // the two expected error frames
  })
