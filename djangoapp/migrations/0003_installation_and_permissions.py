import uuid

from django.db import migrations, models


def make_installation(apps, schema_editor):
    # The identity is made once, here; HpcInstallation.current() makes it for
    # a database whose row was removed.
    installation = apps.get_model("djangoapp", "HpcInstallation")
    db = schema_editor.connection.alias
    if not installation.objects.using(db).exists():
        installation.objects.using(db).create(pk=1, installation_id=uuid.uuid4())


class Migration(migrations.Migration):

    dependencies = [
        ('djangoapp', '0002_cluster_ssh_credentials'),
    ]

    operations = [
        migrations.CreateModel(
            name='HpcInstallation',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('installation_id', models.UUIDField(default=uuid.uuid4, editable=False, help_text='Made once; agents refuse an installation whose id is not the one they first served.', unique=True, verbose_name='installation id')),
                ('created', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'verbose_name': 'installation',
                'ordering': ['id'],
            },
        ),
        migrations.AlterModelOptions(
            name='hpccluster',
            options={'ordering': ['host_name', 'id'], 'permissions': [('pin_host_keys', "Can fetch and pin a cluster's SSH host keys")], 'verbose_name': 'HPC cluster'},
        ),
        migrations.AlterModelOptions(
            name='hpcjob',
            options={'ordering': ['-id'], 'permissions': [('cancel_hpcjob', 'Can cancel HPC jobs')], 'verbose_name': 'HPC job'},
        ),
        migrations.RunPython(make_installation, migrations.RunPython.noop),
    ]
