import { useState } from 'react'

import { AppBackendError, type RecentActivity, type SyncResult, syncNow } from '../appBackend'
import { useStravaTokens } from '../useStravaTokens'

type Phase = 'idle' | 'checking' | 'syncing' | 'synced' | 'blocked' | 'failed'

const PHASE_TEXT: Record<Phase, string> = {
  idle: 'Pull your latest activities from Strava.',
  checking: 'Making sure your Strava token is fresh…',
  syncing: 'Syncing…',
  synced: 'Synced',
  blocked: 'Reconnect Strava before syncing.',
  failed: 'Sync failed',
}

function ActivityList({ activities }: { activities: RecentActivity[] }) {
  if (activities.length === 0) {
    return (
      <p className="sync-detail" data-testid="activity-list-empty">
        No activities on Strava yet.
      </p>
    )
  }
  return (
    <ul className="activity-list" data-testid="activity-list">
      {activities.map((activity) => (
        <li key={activity.id} data-testid="activity-item" data-activity-id={activity.id}>
          <span className="activity-name" data-testid="activity-name">
            {activity.name}
          </span>
          <span className="activity-meta">
            {activity.sport_type} · {(activity.distance / 1000).toFixed(1)} km ·{' '}
            {new Date(activity.start_date).toLocaleDateString()}
          </span>
        </li>
      ))}
    </ul>
  )
}

/** "Sync now": first makes sure the token is fresh (tokensvc), then the app's backend reads the athlete's recent
 * activities through tokensvc's gateway, and the card lists them. */
export function ManualSyncComponent() {
  const { needsReauth, status, ensureFresh } = useStravaTokens()
  const [phase, setPhase] = useState<Phase>('idle')
  const [result, setResult] = useState<SyncResult | null>(null)
  const [detail, setDetail] = useState<string | null>(null)
  const busy = phase === 'checking' || phase === 'syncing'

  async function onSync(): Promise<void> {
    setDetail(null)
    setPhase('checking')
    const fresh = await ensureFresh()
    if (fresh.needsReauth) {
      setPhase('blocked') // never sync on a connection Strava has rejected
      return
    }
    if (fresh.status === 'unavailable' || fresh.status === 'error') {
      setDetail(fresh.error)
      setPhase('failed')
      return
    }
    setPhase('syncing')
    try {
      setResult(await syncNow())
      setPhase('synced')
    } catch (error) {
      if (error instanceof AppBackendError && error.needsReauth) {
        void ensureFresh() // let the banners learn it too
        setPhase('blocked')
      } else {
        setDetail(error instanceof Error ? error.message : String(error))
        setPhase('failed')
      }
    }
  }

  const shown: Phase = needsReauth && !busy ? 'blocked' : phase
  return (
    <section className="card" data-testid="sync-card" data-phase={shown}>
      <header className="card-head">
        <h2>Activities</h2>
      </header>
      <p className={`lead sync-${shown}`} data-testid="sync-status">
        {shown === 'blocked' && status === 'not_connected'
          ? 'Connect Strava to sync your activities.'
          : PHASE_TEXT[shown]}
        {shown === 'failed' && detail !== null && <span>: {detail}</span>}
      </p>
      {shown === 'synced' && result !== null && (
        <>
          <p className="sync-detail" data-testid="sync-detail">
            Read athlete #{result.athlete.id} ({result.athlete.name}) and their recent activities through tokensvc at{' '}
            {new Date(result.synced_at).toLocaleTimeString([], {
              hour: '2-digit',
              minute: '2-digit',
              second: '2-digit',
            })}
          </p>
          <ActivityList activities={result.activities} />
        </>
      )}
      <button
        type="button"
        className="primary"
        data-testid="sync-button"
        disabled={busy || needsReauth || status === 'loading' || status === 'not_connected'}
        onClick={() => void onSync()}
      >
        {busy ? 'Syncing…' : 'Sync now'}
      </button>
    </section>
  )
}
